"""Start the metrics exporter once per host/port, detached, and stop it again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx

from quantflow.serving.registry import state_dir

RECORDS = "exporters"  # one <port>.json per exporter started from this state folder


def exporter_url(host: str, port: int) -> str:
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/metrics"


def _answers(url: str) -> bool:
    try:
        r = httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and "llm_quality_regression_alerts" in r.text


def ensure_exporter(host: str, port: int, timeout_s: float = 30) -> str:
    url = exporter_url(host, port)
    if _answers(url):
        return url
    log_path = state_dir() / "exporter.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "QUANTFLOW_STATE_DIR": str(state_dir())}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "quantflow.monitoring.exporter", "--host", host,
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    records = state_dir() / RECORDS
    records.mkdir(parents=True, exist_ok=True)
    (records / f"{port}.json").write_text(json.dumps({"pid": proc.pid, "url": url}))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _answers(url):
            return url
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    raise RuntimeError(f"metrics exporter did not start on {url}; see {log_path}")


def stop_exporter(port: int | None = None) -> int:
    """Stop the exporter on `port`, or every exporter started from this state folder.
    Returns how many were stopped."""
    records = state_dir() / RECORDS
    paths = [records / f"{port}.json"] if port else sorted(records.glob("*.json"))
    stopped = 0
    for path in paths:
        if not path.exists():
            continue
        try:
            os.killpg(json.loads(path.read_text())["pid"], signal.SIGTERM)
            stopped += 1
        except ProcessLookupError:
            pass
        path.unlink(missing_ok=True)
    return stopped
