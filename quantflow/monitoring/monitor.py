"""One monitoring round: probe quality, check vLLM's latency, alert, persist."""

from __future__ import annotations

import logging
import os
from typing import Any

import httpx

from quantflow.config import MonitorConfig
from quantflow.monitoring import vllm_metrics
from quantflow.monitoring.alerts import raise_alert
from quantflow.monitoring.probes import run_probes
from quantflow.monitoring.state import MonitorState, load_state, save_state
from quantflow.serving.health import CompletionsClient
from quantflow.storage.store import ArtifactStore

log = logging.getLogger("quantflow.monitor")


def state_uri(record: dict, cfg: MonitorConfig) -> str:
    return cfg.state_uri or f"{record['output_uri'].rstrip('/')}/monitor"


def client_for(record: dict) -> CompletionsClient:
    """A client for a deployment record; the API key comes from the environment variable
    the deployment named, never from the record."""
    key = os.environ.get(record.get("api_key_env") or "QUANTFLOW_API_KEY") if record.get("auth") else None
    return CompletionsClient(record["base_url"], record["served_model_name"], key)


DEFAULT_P99_S = 10.0


def latency_limit(record: dict, cfg: MonitorConfig) -> tuple[float, str]:
    """The p99 bound: the config's number if it names one, else the pre-deploy p99 of this
    model on this target times the tolerance, else 10 s."""
    if cfg.latency_p99_max_s is not None:
        return cfg.latency_p99_max_s, "monitor.latency_p99_max_s"
    expected = record.get("performance")
    if expected:
        return (expected["p99_e2el_s"] * cfg.latency_tolerance,
                f"pre-deploy p99 {expected['p99_e2el_s']:.3g}s x {cfg.latency_tolerance}")
    return DEFAULT_P99_S, "default"


def slow_probes(answered: list[dict], expected: dict | None, cfg: MonitorConfig) -> list[dict]:
    """Probes whose generation rate fell below the pre-deploy per-request rate / tolerance.
    Only probes that generated several tokens count: one token is all first-token latency."""
    if not expected or cfg.latency_p99_max_s is not None:
        return []
    floor = expected["per_request_tok_per_s"] / cfg.latency_tolerance
    slow = []
    for r in answered:
        tokens, latency = r.get("completion_tokens"), r.get("latency_s")
        if tokens and tokens >= 4 and latency and tokens / latency < floor:
            slow.append({"prompt": r["prompt"], "tok_per_s": tokens / latency,
                         "expected_tok_per_s": expected["per_request_tok_per_s"]})
    return slow


def server_id(record: dict) -> str:
    """One server process: a new revision (or a restart the record knows of) is another."""
    return f"{record.get('revision')}:{record.get('pid')}:{record.get('upstream_url', record['base_url'])}"


def latency_baseline(state: MonitorState, record: dict) -> dict:
    """The vLLM histograms the round measures from: the previous round's scrape of this same
    server, or else the one the deploy stage took when this server was released (its health
    and fidelity requests are not production traffic). A scrape of the server a rollout
    replaced says nothing about this one's counters."""
    if state.vllm_snapshot and state.vllm_snapshot_server == server_id(record):
        return state.vllm_snapshot
    return record.get("vllm_snapshot") or {}


def monitor_round(record: dict, cfg: MonitorConfig) -> dict[str, Any]:
    """Probe the deployment described by `record` (a deployment registry entry) once."""
    store = ArtifactStore(state_uri(record, cfg))
    state = load_state(store, record["name"])
    state.model = record["served_model_name"]
    state.quantization = record.get("label", "")
    client = client_for(record)
    alerts = []
    try:
        results = run_probes(client, cfg.probes, state, record.get("golden"))
    finally:
        client.close()
    answered = [r for r in results if "error" not in r]
    failed = [r for r in results if "error" in r]
    if failed:
        # An unreachable or refusing endpoint says nothing about the model's quality: it is
        # its own alert, and those probes stay out of the quality window.
        alerts.append(raise_alert(
            state, "endpoint_unreachable", "critical",
            f"{len(failed)} of {len(results)} probes got no answer from {record['base_url']}: "
            f"{failed[0]['error']}", {"errors": [r["error"] for r in failed]}, cfg.auto_rollback))
    score = state.add_probes(answered, cfg.window) if answered else state.quality_score
    if score is not None and answered and score < cfg.min_mean_score:
        alerts.append(raise_alert(
            state, "quality_regression", "critical",
            f"mean quality of the last {min(cfg.window, len(state.history))} probes is "
            f"{score:.2f} < {cfg.min_mean_score}",
            {"score": score, "threshold": cfg.min_mean_score,
             "failed": [r["prompt"] for r in results if r["score"] < 1]}, cfg.auto_rollback))
    p99 = None
    try:
        snap = vllm_metrics.scrape(record["base_url"])
        before = latency_baseline(state, record)
        p99 = vllm_metrics.quantile(before.get("vllm:e2e_request_latency_seconds", {}),
                                    snap["vllm:e2e_request_latency_seconds"], 0.99)
        state.vllm_snapshot, state.vllm_snapshot_server = snap, server_id(record)
    except httpx.HTTPError as err:
        log.warning("monitor: could not scrape %s/metrics: %s", record["base_url"], err)
    limit_s, basis = latency_limit(record, cfg)
    if p99 is not None and p99 > limit_s:
        alerts.append(raise_alert(state, "latency_regression", "warning",
                                  f"vLLM p99 end-to-end latency {p99:.2f}s > {limit_s:.3g}s ({basis}) "
                                  "since the previous check",
                                  {"p99_s": p99, "threshold_s": limit_s, "basis": basis}, cfg.auto_rollback))
    slow = slow_probes(answered, record.get("performance"), cfg)
    if slow:
        alerts.append(raise_alert(state, "latency_regression", "warning",
                                  f"{len(slow)} probe(s) generated slower than the pre-deploy rate "
                                  f"{slow[0]['expected_tok_per_s']:.3g} tok/s / {cfg.latency_tolerance}: "
                                  f"{slow[0]['tok_per_s']:.3g} tok/s", {"slow": slow}, cfg.auto_rollback))
    save_state(store, state)
    log.info("monitor %s: quality %s over %d probes, p99 %s, %d alert(s)", record["name"],
             f"{score:.2f}" if score is not None else "n/a", min(cfg.window, len(state.history)),
             f"{p99:.3f}s" if p99 is not None else "n/a", len(alerts))
    return {"deployment": record["name"], "quality_score": score, "probes": results,
            "p99_latency_s": p99, "alerts": alerts, "state_uri": store.uri()}


def load_round(record: dict, cfg: MonitorConfig, requests: int, concurrency: int,
               max_tokens: int = 16, deadline_s: float = 120) -> dict[str, Any]:
    """Bounded concurrent load through the monitor's client; latencies and throughput are
    recorded in the persisted state like every other observation."""
    from quantflow.monitoring.probes import load_check

    store = ArtifactStore(state_uri(record, cfg))
    state = load_state(store, record["name"])
    client = client_for(record)
    try:
        stats = load_check(client, list(cfg.probes), requests, concurrency,
                           max_tokens, state, deadline_s)
    finally:
        client.close()
    save_state(store, state)
    return stats
