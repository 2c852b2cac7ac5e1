"""Stage 6: first monitoring round against the new deployment; metrics exporter up."""

from __future__ import annotations

from prefect import task

from quantflow.config import MonitorConfig
from quantflow.monitoring.exporter_process import ensure_exporter
from quantflow.monitoring.monitor import monitor_round
from quantflow.tasks.policy import TASK_DEFAULTS

STAGE = "monitor"


def monitor_deployment(monitor: MonitorConfig, deployment: dict) -> dict:
    summary = monitor_round(deployment, monitor)
    summary["metrics_url"] = ensure_exporter(monitor.metrics_host, monitor.metrics_port)
    return summary


monitor_task = task(name=STAGE, **TASK_DEFAULTS)(monitor_deployment)
