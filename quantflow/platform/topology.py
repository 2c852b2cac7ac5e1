"""Which database and broker the Prefect server uses: Prefect's own settings, read from
the environment (or an env file such as infra/single-box.env).

- `PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://…` selects PostgreSQL;
  unset, the server keeps SQLite under .quantflow/prefect.
- `PREFECT_MESSAGING_BROKER=prefect_redis.messaging` (with `PREFECT_REDIS_MESSAGING_*`)
  selects Redis for messaging, the event cache, causal ordering and concurrency leases;
  quantflow's stage locks follow it (quantflow/storage/locks.py).

The embedded default (`quantflow run`, `make demo`) never uses them: its server is started
with these variables removed, so a shell that exports them for `make up` still gets a
self-contained demo.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

# Settings that point the server at external services (prefixes and names).
EXTERNAL_PREFIXES = ("PREFECT_REDIS_MESSAGING_", "PREFECT_MESSAGING_", "PREFECT_SERVER_EVENTS_MESSAGING_")
EXTERNAL_NAMES = ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL",
                  "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING", "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE",
                  "PREFECT_SERVER_DOCKET_URL")


class TopologyError(RuntimeError):
    pass


def embedded_env(env: dict[str, str]) -> dict[str, str]:
    """The environment for the embedded server: SQLite and in-memory messaging."""
    return {k: v for k, v in env.items()
            if k not in EXTERNAL_NAMES and not k.startswith(EXTERNAL_PREFIXES)}


def load_env_file(path: str | Path) -> dict[str, str]:
    """KEY=VALUE lines (comments and blank lines skipped). Variables already set in the
    environment win, as with docker compose's env files."""
    path = Path(path)
    if not path.is_file():
        raise TopologyError(f"env file {path} does not exist; see infra/single-box.env for an example")
    loaded = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not key.strip().isidentifier():
            raise TopologyError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
        loaded[key.strip()] = value.strip().strip('"').strip("'")
    for key, value in loaded.items():
        os.environ.setdefault(key, value)
    return loaded


def database_url() -> str | None:
    return (os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL")
            or os.environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL"))


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def describe() -> dict[str, str]:
    from quantflow.storage.locks import redis_configured

    url = database_url()
    redis = redis_configured()
    return {"database": "postgresql" if url and url.startswith("postgresql") else "sqlite",
            "database_url": redact(url) if url else "sqlite (.quantflow/prefect)",
            "broker": "redis" if redis else "memory",
            "stage_locks": "redis" if redis else "file (this machine)"}


def _pg_dsn(url: str, database: str | None = None) -> str:
    parts = urlsplit(url.replace("postgresql+asyncpg://", "postgresql://", 1))
    if database is not None:
        parts = parts._replace(path=f"/{database}")
    return urlunsplit(parts)


async def _ensure_database(url: str) -> bool:
    import asyncpg

    name = urlsplit(url).path.lstrip("/")
    try:
        conn = await asyncpg.connect(_pg_dsn(url), timeout=10)
        await conn.close()
        return False
    except asyncpg.InvalidCatalogNameError:
        pass
    admin = await asyncpg.connect(_pg_dsn(url, "postgres"), timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return True


def check_services() -> dict[str, str]:
    """Fail fast, naming the variable, when a configured service does not answer; create
    the PostgreSQL database on first use (Prefect creates its tables, not the database)."""
    import asyncio

    topo = describe()
    url = database_url()
    if topo["database"] == "postgresql":
        if not url.startswith("postgresql+asyncpg://"):
            raise TopologyError("PREFECT_API_DATABASE_CONNECTION_URL must use the asyncpg driver: "
                                f"postgresql+asyncpg://user@host:5432/db (got {redact(url)})")
        try:
            if asyncio.run(_ensure_database(url)):
                topo["database_created"] = "yes"
        except Exception as exc:  # noqa: BLE001 - asyncpg's own errors and OSError alike
            raise TopologyError(f"PostgreSQL at {redact(url)} (PREFECT_API_DATABASE_CONNECTION_URL) "
                                f"does not answer: {exc}. Start PostgreSQL or unset the variable "
                                "to use SQLite.") from exc
    if topo["broker"] == "redis":
        from prefect_redis.client import RedisMessagingSettings
        import redis

        settings = RedisMessagingSettings()
        where = settings.url or f"redis://{settings.host}:{settings.port}/{settings.db}"
        client = (redis.Redis.from_url(settings.url) if settings.url else
                  redis.Redis(host=settings.host, port=settings.port, db=settings.db,
                              password=settings.password or None, ssl=settings.ssl))
        try:
            client.ping()
        except redis.RedisError as exc:
            raise TopologyError(f"Redis at {where} (PREFECT_REDIS_MESSAGING_*) does not answer: {exc}. "
                                "Start Redis or unset PREFECT_MESSAGING_BROKER to use in-memory "
                                "messaging.") from exc
        finally:
            client.close()
    return topo
