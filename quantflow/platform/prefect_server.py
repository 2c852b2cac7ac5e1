"""The embedded default: a local Prefect server (SQLite) when none is configured.

Its database and logs live in ./.quantflow/prefect, so the demo leaves ~/.prefect alone;
`quantflow stop` (make stop) stops it again.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

from quantflow.processes import start_detached, stop_groups
from quantflow.serving.registry import state_dir

RECORD = "prefect-server.json"
DEFAULT_PORT = 4200


def configured_api_url() -> str | None:
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def _healthy(api_url: str) -> bool:
    try:
        return httpx.get(api_url.rstrip("/") + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def running_local_server() -> str | None:
    """API URL of the local server `make up`/`make demo` started from this checkout, if up."""
    record_path = state_dir() / RECORD
    if record_path.exists():
        url = json.loads(record_path.read_text())["api_url"]
        if _healthy(url):
            return url
    return None


def local_home() -> Path:
    return state_dir() / "prefect"


def ensure_local_server(port: int = DEFAULT_PORT, timeout_s: float = 120, embedded: bool = True,
                        ui_api_url: str | None = None) -> str:
    """API URL of the local server, starting it if it is not running. `embedded` (quantflow
    run, make demo) strips PostgreSQL/Redis settings; `make up` keeps them. `ui_api_url`:
    where the UI in a browser sends its API calls (platform/ui_proxy.py); default the server."""
    running = running_local_server()
    if running:
        return running
    record_path = state_dir() / RECORD
    api_url = f"http://127.0.0.1:{port}/api"
    if _healthy(api_url):
        return api_url
    home = local_home()
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    if embedded:
        from quantflow.platform.topology import embedded_env

        env = embedded_env(env)
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_API_HOST="127.0.0.1")
    # The UI asks /ui-settings where the API is; unset, Prefect answers port 4200 whatever
    # port the server runs on, and a UI on any other port shows an empty workspace (or
    # another server's runs).
    env.setdefault("PREFECT_UI_API_URL", ui_api_url or api_url)
    # A 503 (SQLite "database is locked") is otherwise answered without a trace in server.log.
    env.setdefault("PREFECT_API_LOG_RETRYABLE_ERRORS", "true")
    prefect_bin = str(Path(sys.executable).with_name("prefect"))
    proc, started = start_detached([prefect_bin, "server", "start", "--host", "127.0.0.1",
                                    "--port", str(port)], home / "server.log", env)
    record_path.write_text(json.dumps({**started, "api_url": api_url}))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _healthy(api_url):
            return api_url
        if proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited (code {proc.returncode}); "
                               f"see {home / 'server.log'}")
        time.sleep(0.5)
    raise RuntimeError(f"the Prefect server did not answer within {timeout_s:.0f}s; "
                       f"see {home / 'server.log'}")


def stop_local_server() -> bool:
    record_path = state_dir() / RECORD
    if not record_path.exists():
        return False
    stop_groups([json.loads(record_path.read_text())])
    record_path.unlink(missing_ok=True)
    return True


@contextmanager
def prefect_api(auto_start: bool = True) -> Iterator[str]:
    """Use the configured Prefect API, or a local server started on demand."""
    from prefect.settings import (PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH,
                                  temporary_settings)

    url = configured_api_url()
    if url:
        yield url
        return
    if not auto_start:
        raise RuntimeError("no Prefect API configured (PREFECT_API_URL)")
    url = ensure_local_server()
    with temporary_settings(updates={PREFECT_API_URL: url,
                                     PREFECT_LOCAL_STORAGE_PATH: str(local_home() / "storage")}):
        yield url


def ui_url(api_url: str) -> str:
    return api_url.rstrip("/").removesuffix("/api")
