"""Alerts: a counter in the monitor state and a Prefect event automations can act on."""

from __future__ import annotations

import logging
from typing import Any

from quantflow.storage.manifests import now
from quantflow.monitoring.state import MonitorState

log = logging.getLogger("quantflow.monitor")
EVENT_PREFIX = "quantflow.monitor"


def raise_alert(state: MonitorState, kind: str, severity: str, message: str,
                details: dict[str, Any], auto_rollback: bool = False) -> dict[str, Any]:
    alert = {"time": now(), "kind": kind, "severity": severity, "message": message, **details}
    state.alerts[severity] = state.alerts.get(severity, 0) + 1
    state.alert_log = (state.alert_log + [alert])[-200:]
    log.warning("ALERT [%s] %s: %s", severity, state.deployment, message)
    _emit(state, kind, severity, message, details, auto_rollback)
    return alert


def _emit(state: MonitorState, kind: str, severity: str, message: str, details: dict,
          auto_rollback: bool) -> None:
    """Best effort: monitoring keeps working when the Prefect API is unreachable."""
    try:
        from prefect.events import emit_event

        emit_event(event=f"{EVENT_PREFIX}.{kind}",
                   resource={"prefect.resource.id": f"quantflow.deployment.{state.deployment}",
                             "prefect.resource.name": state.deployment,
                             "quantflow.severity": severity,
                             "quantflow.quantization": state.quantization,
                             # The rollback deployment's trigger matches on it (monitor.auto_rollback).
                             "quantflow.auto-rollback": str(auto_rollback).lower()},
                   payload={"message": message, "severity": severity, **details})
    except Exception as err:  # noqa: BLE001
        log.debug("could not emit Prefect event: %s", err)
