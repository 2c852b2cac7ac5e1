"""The browser's way to the Prefect API on the default (SQLite) topology: nginx in front of
the server, retrying what SQLite refused.

Measured on this 2-core machine kind: submitting the quantize-pipeline form 10-20 times in a
row right after `make up` lost 1-2 submissions ("Oops. Something went wrong", no run). The
server had answered 503: its INSERT into flow_run hit "database is locked". Prefect opens
DEFERRED transactions; in WAL mode one that read and then writes gets SQLITE_BUSY at once
when another connection committed meanwhile, so the 60 s busy timeout never applies (the
workers' polls commit every few seconds; with no worker running, 20 of 20 went through;
upstream PrefectHQ/prefect#18934). Prefect's Python client retries a 503, and so do the
workers and `quantflow submit`; the UI does not. A 503 from Prefect is an exception it
classes as retryable, raised before its transaction committed, so sending the request again
cannot create a run twice. nginx does that here for the UI's API calls (the UI itself and
every other client talk to the server directly). PostgreSQL (infra/single-box.env) has no
such lock and needs no proxy.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import httpx

from quantflow.processes import start_detached, stop_groups
from quantflow.serving.proxy import internal_port, nginx_binary

log = logging.getLogger("quantflow.platform")
TRIES = 5


def render_conf(listen_port: int, api_port: int) -> str:
    # The same server listed TRIES times: proxy_next_upstream moves to the "next" one, which
    # is the same server again; max_fails=0 keeps a 503 from marking it down.
    servers = "\n".join(f"        server 127.0.0.1:{api_port} max_fails=0;" for _ in range(TRIES))
    return f"""# Written by quantflow (platform/ui_proxy.py) at `make up`.
worker_processes 1;
pid nginx.pid;
error_log logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    client_max_body_size 0;
    client_body_buffer_size 4m;  # the form posts the whole JSON schema with each validation
    upstream prefect {{
{servers}
    }}
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{listen_port};
        location / {{
            proxy_pass http://prefect;
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 3600s;
            proxy_buffering off;
            # A 503 is Prefect's "retryable, nothing committed": resent, POSTs included.
            proxy_next_upstream error timeout http_503 non_idempotent;
            proxy_next_upstream_tries {TRIES};
        }}
    }}
}}
"""


def proxy_port(database_url: str) -> int | None:
    """The port the UI's API calls go to, where they need the proxy: SQLite, nginx installed."""
    if not database_url.startswith("sqlite"):
        return None
    if nginx_binary() is None:
        log.warning("nginx is not installed: the Prefect UI talks to the SQLite server directly, and "
                    "a form submission can fail with 'Something went wrong' when SQLite is busy "
                    "(`make system-packages` installs nginx-light; PostgreSQL avoids it)")
        return None
    return internal_port()


def start_ui_proxy(prefix: Path, listen_port: int, api_port: int, timeout_s: float = 20) -> dict:
    binary = nginx_binary()
    for sub in ("logs", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    (prefix / "nginx.conf").write_text(render_conf(listen_port, api_port))
    proc, started = start_detached([binary, "-p", f"{prefix}/", "-c", "nginx.conf", "-e", "logs/error.log",
                                    "-g", "daemon off;"], prefix / "logs" / "nginx.out", env={})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{listen_port}/api/health", timeout=2).status_code == 200:
                return {**started, "port": listen_port, "prefix": str(prefix)}
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"nginx in front of the Prefect API exited (code {proc.returncode}): "
                               + (prefix / "logs" / "nginx.out").read_text()[-2000:])
        time.sleep(0.3)
    stop_groups([started])
    raise RuntimeError(f"nginx in front of the Prefect API did not answer on port {listen_port} "
                       f"in {timeout_s:.0f} s; see {prefix / 'logs'}")


def stop_ui_proxy(record: dict | None) -> None:
    if record:
        stop_groups([record])
