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
def moto_server(checks_credentials: bool = False, unchecked_requests: int = 0) -> Iterator[str]:
    """A local S3-API server (moto) on a free port, answering before this yields its URL.
    checks_credentials: keys and IAM policies are checked (INITIAL_NO_AUTH_ACTION_COUNT),
    after the first `unchecked_requests` requests; the readiness probe here is one of them."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx

    from quantflow.serving.ports import free_port

    port = free_port()
    env = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": str(unchecked_requests)} if checks_credentials else {})}
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


@contextmanager
def s3_denying_writes(bucket: str, denied_keys: str) -> Iterator[dict[str, str]]:
    """A moto server that checks IAM policies, with a bucket and a user whose policy allows
    all of S3 except PutObject on `denied_keys` (an ARN pattern inside the bucket, e.g.
    "*/calibration_data.pt"): S3's own 403 AccessDenied for those objects only. Yields the
    AWS_* environment of that user."""
    import json

    import boto3

    # Unchecked: moto_server's readiness probe and the three IAM calls that make the user.
    with moto_server(checks_credentials=True, unchecked_requests=4) as url:
        anyone = {"endpoint_url": url, "region_name": "us-east-1", "aws_access_key_id": "setup",
                  "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", **anyone)
        iam.create_user(UserName="stage-writer")
        iam.put_user_policy(UserName="stage-writer", PolicyName="deny-some-writes", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
                {"Effect": "Deny", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{bucket}/{denied_keys}"}]}))
        key = iam.create_access_key(UserName="stage-writer")["AccessKey"]
        env = {"AWS_ENDPOINT_URL": url, "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)
        yield env
