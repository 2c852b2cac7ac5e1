"""PostgreSQL and Redis as this kind of machine provides them (127.0.0.1:5432 trust auth,
127.0.0.1:6379). Tests that need them skip with the reason where they are absent."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from contextlib import contextmanager
from typing import Iterator

# The ports can be moved (to a closed one) to run the suite as a machine without them would.
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", int(os.environ.get("QUANTFLOW_TEST_PG_PORT", 5432)), "postgres"
REDIS_HOST, REDIS_PORT = "127.0.0.1", int(os.environ.get("QUANTFLOW_TEST_REDIS_PORT", 6379))
REDIS_TEST_DB = 13  # a database index of its own: tests never touch db 0


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def redis_reason() -> str | None:
    if not _answers(REDIS_HOST, REDIS_PORT):
        return f"no Redis at {REDIS_HOST}:{REDIS_PORT}"
    import redis

    try:
        redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_timeout=2).ping()
    except redis.RedisError as exc:
        return f"Redis at {REDIS_HOST}:{REDIS_PORT} does not answer PING: {exc}"
    return None


async def _pg(sql: str, database: str = "postgres"):
    import asyncpg

    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=database, timeout=5)
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()


def pg_query(sql: str, database: str = "postgres"):
    return asyncio.run(_pg(sql, database))


def postgres_reason() -> str | None:
    if not _answers(PG_HOST, PG_PORT):
        return f"no PostgreSQL at {PG_HOST}:{PG_PORT}"
    try:
        pg_query("select 1")
    except Exception as exc:  # noqa: BLE001 - any failure means: not usable here
        return f"PostgreSQL at {PG_HOST}:{PG_PORT} refused user {PG_USER}: {exc}"
    return None


def services_reason() -> str | None:
    return postgres_reason() or redis_reason()


def production_env(database: str, redis_db: int = REDIS_TEST_DB) -> dict[str, str]:
    """infra/single-box.env, pointed at a database and Redis index of the test's own."""
    return {
        "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}",
        "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
        "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
        "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
        "PREFECT_REDIS_MESSAGING_HOST": REDIS_HOST,
        "PREFECT_REDIS_MESSAGING_PORT": str(REDIS_PORT),
        "PREFECT_REDIS_MESSAGING_DB": str(redis_db),
    }


def drop_database(database: str) -> None:
    pg_query(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def flush_redis(db: int = REDIS_TEST_DB) -> None:
    import redis

    redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db).flushdb()


@contextmanager
def production_services(prefix: str, redis_db: int = REDIS_TEST_DB) -> Iterator[str | None]:
    """Point Prefect at a fresh PostgreSQL database and a Redis index of its own (in
    os.environ, for `make up` and everything it starts), and drop both afterwards. Yields
    the database name, or None where the services are absent (SQLite then)."""
    if services_reason():
        yield None
        return
    database = f"{prefix}_{uuid.uuid4().hex[:8]}"
    os.environ.update(production_env(database, redis_db))
    flush_redis(redis_db)
    try:
        yield database
    finally:
        drop_database(database)
        flush_redis(redis_db)


@contextmanager
def moto_server(checks_credentials: bool = False) -> Iterator[str]:
    """A local S3-API server (moto) on a free port, answering before this yields its URL.
    checks_credentials: unknown keys are refused (INITIAL_NO_AUTH_ACTION_COUNT=0)."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx

    from quantflow.serving.ports import free_port

    port = free_port()
    env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if checks_credentials else {})}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
                             "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
