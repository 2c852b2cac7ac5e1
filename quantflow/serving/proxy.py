"""One stable address per local deployment: an nginx master in front of the live vLLM server.

Clients keep `deploy.host:deploy.port` across rollouts. vLLM servers listen on loopback
ports of their own; a rollout rewrites the upstream file and reloads nginx gracefully
(SIGHUP): new connections go to the new server, the old workers finish the requests they
hold and exit. Only when they are gone is the old vLLM stopped, so no request is cut.

Each deployment name has its own prefix under the state folder (conf, pid file, logs,
temp files), and its master runs detached in its own session like the vLLM servers.
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import psutil

from quantflow.processes import group_members, reused, start_detached, stop_groups
from quantflow.serving.ports import free_port

log = logging.getLogger("quantflow.proxy")
# nginx adds this to every answer: which vLLM server served it (rollouts check it).
UPSTREAM_HEADER = "X-Quantflow-Upstream"
INSTALL_HINT = ("install nginx-light (`make system-packages`, or apt-get install nginx-light), "
                "or set deploy.proxy: none (the address then changes with each rollout)")


class ProxyFailed(Exception):
    pass


def nginx_binary() -> str | None:
    # /usr/sbin is not on a normal user's PATH, and that is where Debian installs nginx.
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
    return shutil.which("nginx", path=path)


def internal_port() -> int:
    """A free loopback port for the next vLLM server (clients never see it)."""
    return free_port()


def _listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def render_conf(host: str, port: int, read_timeout_s: float, user: str | None) -> str:
    timeout = int(read_timeout_s) + 30  # vLLM's own request timeout fires first
    return f"""# Written by quantflow (serving/proxy.py); rewritten at each start.
{f"user {user};" if user else ""}
worker_processes 1;
pid nginx.pid;
error_log logs/error.log notice;
events {{ worker_connections 1024; }}
http {{
    # A canary's analysis reads each side's requests, failures and latency from these lines
    # (serving/canary.py): every attempt's server and status, the time the client waited.
    log_format upstream '$remote_addr [$time_local] "$request" $status $body_bytes_sent '
                        'upstream=$upstream_addr rt=$request_time ustatus=$upstream_status';
    access_log logs/access.log upstream;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    client_max_body_size 64m;
    client_body_buffer_size 1m;
    # No keep-alive towards clients: at a reload the old workers close their idle kept-alive
    # connections, and a request a client sent on one at that instant is lost ("Server
    # disconnected without sending a response"; 27 of 2,501 requests over 60 switches with
    # keep-alive, 0 of 8,404 over 200 without: tests/test_proxy_reload.py). A connection per
    # request costs a loopback handshake, nothing beside a completion's time.
    keepalive_timeout 0;
    include upstream.conf;
    include shadow_http.conf;
    server {{
        listen {_listen(host, port)};
        include shadow_server.conf;
        location / {{
            include shadow_location.conf;
            proxy_pass http://vllm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            # Streamed completions (SSE) reach the client token by token.
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout {timeout}s;
            proxy_send_timeout {timeout}s;
            # With two servers (a canary step), a request whose server failed before it
            # answered (refused connection, killed mid-request) is sent to the other one:
            # a completion changes nothing on the server, so sending it twice is safe
            # (non_idempotent), and clients see no failure from a dying canary. One server in
            # the group is never marked down.
            proxy_next_upstream error timeout non_idempotent;
            proxy_next_upstream_tries 2;
            add_header {UPSTREAM_HEADER} $upstream_addr always;
        }}
    }}
}}
"""


def render_upstream(upstream_port: int, canary: tuple[int, int] | None = None) -> str:
    """One server, or with `canary` = (port, percent) the live one and a canary splitting
    the requests by weight (percent < 100)."""
    # keepalive_timeout below uvicorn's 5 s keep-alive: nginx never reuses a connection
    # vLLM is closing (that request would fail).
    if canary is None:
        servers = f"    server 127.0.0.1:{upstream_port};\n"
    else:
        port, percent = canary
        # After one failure a server gets nothing for fail_timeout: a dead canary costs one
        # retried request per 30 s, not one per request.
        servers = (f"    server 127.0.0.1:{upstream_port} weight={100 - percent} max_fails=1 fail_timeout=30s;\n"
                   f"    server 127.0.0.1:{port} weight={percent} max_fails=1 fail_timeout=30s;\n")
    return f"upstream vllm {{\n{servers}    keepalive 32;\n    keepalive_timeout 4s;\n}}\n"


SHADOW_FILES = ("shadow_http.conf", "shadow_server.conf", "shadow_location.conf")
SHADOW_PATH = "/_quantflow_shadow"


def render_shadow(comparer_port: int, share: float) -> dict[str, str]:
    """nginx copies a `share` of the requests (drawn per request id) to the comparer at
    `comparer_port`; the copy's answer is discarded, the client gets the primary's only."""
    return {
        "shadow_http.conf": (f'split_clients "${{request_id}}" $quantflow_shadow {{\n'
                             f'    {share * 100:.2f}% 1;\n' + ('    * "";\n' if share < 1 else "") + "}\n"),
        "shadow_server.conf": (f"location = {SHADOW_PATH} {{\n    internal;\n"
                               f'    if ($quantflow_shadow = "") {{ return 204; }}\n'
                               f"    proxy_pass http://127.0.0.1:{comparer_port}$request_uri;\n"
                               f"    proxy_connect_timeout 2s;\n    proxy_read_timeout 10s;\n}}\n"),
        "shadow_location.conf": f"mirror {SHADOW_PATH};\nmirror_request_body on;\n",
    }


class NginxProxy:
    def __init__(self, prefix: Path, host: str, port: int, pid: int | None = None,
                 create_time: float | None = None):
        self.prefix = prefix
        self.host = host
        self.port = port
        self.pid = pid
        self.create_time = create_time

    @classmethod
    def of_record(cls, rec: dict) -> "NginxProxy":
        return cls(Path(rec["prefix"]), rec["host"], rec["port"], rec.get("pid"), rec.get("create_time"))

    @property
    def base_url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def record(self) -> dict:
        return {"kind": "nginx", "prefix": str(self.prefix), "host": self.host, "port": self.port,
                "pid": self.pid, "create_time": self.create_time, "base_url": self.base_url}

    def _cmd(self, *extra: str) -> list[str]:
        binary = nginx_binary()
        if binary is None:
            raise ProxyFailed(f"nginx is not installed: {INSTALL_HINT}")
        return [binary, "-p", str(self.prefix) + "/", "-c", "nginx.conf", "-e", "logs/error.log", *extra]

    def alive(self) -> bool:
        if not self.pid or reused(self.pid, self.create_time):
            return False
        return self.pid in group_members(self.pid)

    def upstream_port(self) -> int | None:
        try:
            text = (self.prefix / "upstream.conf").read_text()
        except OSError:
            return None
        # The first server is the live one (a canary split lists it first).
        return int(re.split(r"[;\s]", text.split("server 127.0.0.1:", 1)[1], maxsplit=1)[0])

    def _write(self, name: str, text: str) -> None:
        tmp = self.prefix / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.prefix / name)  # nginx never reads half a file

    def _test_conf(self) -> None:
        done = subprocess.run(self._cmd("-t", "-q"), capture_output=True, text=True)
        if done.returncode != 0:
            raise ProxyFailed(f"nginx rejected {self.prefix / 'nginx.conf'}: "
                              f"{(done.stderr or done.stdout).strip()}")

    def error_tail(self, lines: int = 8) -> str:
        text = ""
        for f in ("logs/error.log", "logs/nginx.out"):
            try:
                text += (self.prefix / f).read_text(errors="replace")
            except OSError:
                pass
        return "\n".join(text.strip().splitlines()[-lines:]) or "(no nginx log)"

    def start(self, upstream_port: int, read_timeout_s: float,
              tag: dict[str, str] | None = None) -> "NginxProxy":
        """`tag`: the rollout's QUANTFLOW_SERVER_TAG, so that if the deploying process dies
        before the deployment is recorded, the next deploy stops this nginx with its server."""
        for sub in ("logs", "tmp"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        # As root, nginx would run its workers as nobody, who cannot write the temp folder
        # under a private state folder: they run as the user who deployed instead.
        user = getpass.getuser() if os.geteuid() == 0 else None
        self._write("nginx.conf", render_conf(self.host, self.port, read_timeout_s, user))
        self._write("upstream.conf", render_upstream(upstream_port))
        self._clear_shadow()
        self._test_conf()
        env = {k: v for k, v in os.environ.items() if k.startswith(("PATH", "LANG", "LC_"))}
        env.update(tag or {})
        # daemon off: the master is the process start_detached made (group leader, pid known).
        proc, started = start_detached(self._cmd("-g", "daemon off;"), self.prefix / "logs" / "nginx.out", env)
        self.pid, self.create_time = started["pid"], started["create_time"]
        try:
            self.wait_serving(upstream_port, timeout_s=30, proc=proc)
        except ProxyFailed:
            self.stop()
            raise
        return self

    def wait_serving(self, upstream_port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
        """Until an answer through the stable address came from 127.0.0.1:upstream_port."""
        want = f"127.0.0.1:{upstream_port}"
        deadline = time.monotonic() + timeout_s
        seen = None
        while time.monotonic() < deadline:
            if (proc is not None and proc.poll() is not None) or not self.alive():
                raise ProxyFailed(f"nginx for {self.base_url} exited:\n{self.error_tail()}")
            try:
                # A fresh connection each time: a kept-alive one may still be an old worker's.
                r = httpx.get(self.base_url + "/health", timeout=5, headers={"Connection": "close"})
                seen = f"HTTP {r.status_code} from {r.headers.get(UPSTREAM_HEADER)}"
                if r.headers.get(UPSTREAM_HEADER) == want and r.status_code == 200:
                    return
            except httpx.HTTPError as err:
                seen = repr(err)
            time.sleep(0.2)
        raise ProxyFailed(f"{self.base_url} did not answer from {want} within {timeout_s:.0f}s "
                          f"(last: {seen})\n{self.error_tail()}")

    def workers(self) -> set[int]:
        try:
            return {p.pid for p in psutil.Process(self.pid).children()}
        except psutil.Error:
            return set()

    def switch(self, upstream_port: int, drain_timeout_s: float) -> None:
        """Point the stable address at upstream_port, then wait for the old workers (and the
        requests they still serve) to finish. On failure the previous upstream is restored."""
        previous = self.upstream_port()
        old_workers = self.workers()
        self._write("upstream.conf", render_upstream(upstream_port))
        self._clear_shadow()  # a canary's mirroring ends with its last step
        try:
            self._test_conf()
            os.kill(self.pid, signal.SIGHUP)  # graceful reload
            self.wait_serving(upstream_port, timeout_s=30)
        except (ProxyFailed, OSError) as err:
            if previous is not None:
                self._write("upstream.conf", render_upstream(previous))
                if self.alive():
                    os.kill(self.pid, signal.SIGHUP)
            raise ProxyFailed(str(err)) from None
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline and old_workers & self.workers():
            time.sleep(0.2)
        left = old_workers & self.workers()
        if left:
            log.warning("proxy: old nginx workers %s still busy after %.0fs; stopping the old "
                        "server anyway", sorted(left), drain_timeout_s)

    def _clear_shadow(self) -> None:
        for name in SHADOW_FILES:
            self._write(name, "")

    def split(self, live_port: int, canary_port: int, percent: int,
              shadow: tuple[int, float] | None = None) -> None:
        """Send `percent` of new requests to canary_port and the rest to live_port; with
        `shadow` = (comparer port, share), copy that share of them to the comparer. Returns
        once nginx's new workers serve this split. On failure nothing changed: the previous
        files are restored (nginx reloaded with them if it had been told)."""
        names = ("upstream.conf", *SHADOW_FILES)
        before = {n: (self.prefix / n).read_text() for n in names}
        old_workers = self.workers()
        self._write("upstream.conf", render_upstream(live_port, (canary_port, percent)))
        files = render_shadow(*shadow) if shadow and shadow[1] > 0 else dict.fromkeys(SHADOW_FILES, "")
        for n, text in files.items():
            self._write(n, text)
        try:
            self._test_conf()
            os.kill(self.pid, signal.SIGHUP)
            deadline = time.monotonic() + 30
            while not (self.workers() - old_workers):  # the new workers read the new files
                if time.monotonic() > deadline or not self.alive():
                    raise ProxyFailed(f"nginx for {self.base_url} did not start workers for the canary "
                                      f"split:\n{self.error_tail()}")
                time.sleep(0.1)
        except (ProxyFailed, OSError) as err:
            for n, text in before.items():
                self._write(n, text)
            if self.alive():
                os.kill(self.pid, signal.SIGHUP)
            raise ProxyFailed(str(err)) from None

    def access_log(self) -> Path:
        return self.prefix / "logs" / "access.log"

    def stop(self) -> None:
        if not self.pid:
            return
        stop_groups([{"pid": self.pid, "create_time": self.create_time}], waits=(10, 5, 5),
                    on_wait=self._reap)
        self._reap()

    def _reap(self) -> None:
        try:
            os.waitpid(self.pid, os.WNOHANG)  # our own child (same process): no zombie left
        except ChildProcessError:
            pass


def stop_proxy(record: dict) -> None:
    if record.get("proxy"):
        NginxProxy.of_record(record["proxy"]).stop()
