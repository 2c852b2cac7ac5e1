"""The monitoring flow: deploy it on an interval schedule (deployments/prefect.yaml)."""

from __future__ import annotations

from prefect import flow

from quantflow.config import MonitorConfig
from quantflow.errors import StageError
from quantflow.monitoring.exporter_process import ensure_exporter
from quantflow.monitoring.monitor import load_round, monitor_round
from quantflow.serving.registry import DeploymentRegistry


@flow(name="quality-monitor", log_prints=True)
def quality_monitor(deployment: str = "demo", load_requests: int = 0, load_concurrency: int = 4,
                    start_exporter: bool = True) -> dict:
    """Probe a live deployment with known-good prompts, check vLLM's latency, alert."""
    record = DeploymentRegistry().active(deployment)
    if not record:
        raise StageError("monitor", f"no active deployment named {deployment!r}",
                         "deploy one with `quantflow run`, or pass the right name")
    cfg = MonitorConfig.model_validate(record.get("monitor") or {})
    result = monitor_round(record, cfg)
    if load_requests:
        result["load"] = load_round(record, cfg, load_requests, load_concurrency)
    if start_exporter:
        result["metrics_url"] = ensure_exporter(cfg.metrics_host, cfg.metrics_port)
    return result
