"""Start the metrics exporter once per host/port, detached, and stop it again."""

from __future__ import annotations

import json
import os
import sys
import time

import httpx

from quantflow.processes import start_detached, stop_groups
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
    env = {**os.environ, "QUANTFLOW_STATE_DIR": str(state_dir())}
    proc, started = start_detached([sys.executable, "-m", "quantflow.monitoring.exporter", "--host", host,
                                    "--port", str(port)], log_path, env)
    records = state_dir() / RECORDS
    records.mkdir(parents=True, exist_ok=True)
    (records / f"{port}.json").write_text(json.dumps({**started, "url": url}))
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
    paths = [p for p in ([records / f"{port}.json"] if port else sorted(records.glob("*.json")))
             if p.exists()]
    stop_groups([json.loads(p.read_text()) for p in paths], waits=(5, 2, 2))
    for p in paths:
        p.unlink(missing_ok=True)
    return len(paths)
