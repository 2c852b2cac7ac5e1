"""Which database and broker the server gets: from Prefect's own settings for `make up`,
never for the embedded default; a configured service that does not answer is named."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from conftest import REPO, free_port

CLOSED = free_port()  # nothing listens here


def test_embedded_server_drops_external_services():
    from quantflow.platform.topology import embedded_env

    env = {"PATH": "/bin", "PREFECT_API_DATABASE_CONNECTION_URL": "postgresql+asyncpg://x@h/db",
           "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging", "PREFECT_REDIS_MESSAGING_HOST": "h",
           "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
           "PREFECT_SERVER_API_AUTH_STRING": "a:b"}
    assert embedded_env(env) == {"PATH": "/bin", "PREFECT_SERVER_API_AUTH_STRING": "a:b"}


def test_embedded_server_stays_on_sqlite_when_postgres_is_exported(tmp_path, monkeypatch):
    """A shell that exports the platform's settings (here a PostgreSQL that does not even
    exist) still gets the self-contained demo server."""
    from quantflow.platform.prefect_server import ensure_local_server, stop_local_server

    monkeypatch.setenv("QUANTFLOW_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", f"postgresql+asyncpg://nobody@127.0.0.1:{CLOSED}/none")
    monkeypatch.setenv("PREFECT_MESSAGING_BROKER", "prefect_redis.messaging")
    try:
        url = ensure_local_server(port=free_port(), timeout_s=180)
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        assert (tmp_path / "prefect" / "prefect.db").exists()
    finally:
        stop_local_server()


def up_with(env_lines: str, tmp_path) -> subprocess.CompletedProcess:
    env_file = tmp_path / "platform.env"
    env_file.write_text(env_lines)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_REDIS", "PREFECT_MESSAGING"))
           and k != "PREFECT_API_DATABASE_CONNECTION_URL"}
    env["QUANTFLOW_STATE_DIR"] = str(tmp_path / "state")
    return subprocess.run([sys.executable, "-m", "quantflow.platform", "up", "--port", str(free_port()),
                           "--env-file", str(env_file)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("lines, says", [
    (f"PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://postgres@127.0.0.1:{CLOSED}/prefect\n",
     "PREFECT_API_DATABASE_CONNECTION_URL"),
    ("PREFECT_API_DATABASE_CONNECTION_URL=postgresql://postgres@127.0.0.1:5432/prefect\n",
     "asyncpg driver"),
    (f"PREFECT_MESSAGING_BROKER=prefect_redis.messaging\nPREFECT_REDIS_MESSAGING_PORT={CLOSED}\n",
     "PREFECT_REDIS_MESSAGING_"),
    ("this is not a setting\n", "platform.env:1: expected KEY=VALUE"),
])
def test_make_up_names_the_setting_that_does_not_work(tmp_path, lines, says):
    proc = up_with(lines, tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert says in proc.stderr
    assert not (tmp_path / "state" / "prefect-server.json").exists()  # nothing was started
