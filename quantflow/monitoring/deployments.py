"""What is deployed on this machine, one row a deployment (`quantflow deployments`), and
stopping one of them by name (`quantflow stop NAME`)."""

from __future__ import annotations

from typing import Any

from quantflow.config import MonitorConfig
from quantflow.errors import InputError
from quantflow.monitoring.monitor import state_uri
from quantflow.monitoring.state import load_state
from quantflow.serving.process import server_of
from quantflow.serving.registry import DeploymentRegistry
from quantflow.storage.store import ArtifactStore

COLUMNS = ("name", "model", "scheme", "address", "revision", "since", "last_health", "quality_score")


def deployment_rows(registry: DeploymentRegistry | None = None) -> list[dict[str, Any]]:
    """Every live deployment: its served model, scheme, stable address, revision, when it
    went live, the last monitoring probe (or the deploy's health check) and its quality."""
    registry = registry or DeploymentRegistry()
    rows = []
    for name in registry.names():
        doc = registry.read(name)
        record = doc["active"]
        if not record:
            continue
        state = None
        if record.get("output_uri"):
            try:
                cfg = MonitorConfig.model_validate(record.get("monitor") or {})
                state = load_state(ArtifactStore(state_uri(record, cfg)), name)
            except Exception:  # noqa: BLE001 - an unreadable state must not hide the deployment
                state = None
        last = state.history[-1] if state and state.history else None
        rows.append({
            "name": name, "model": record.get("served_model_name"), "checkpoint": record.get("model_dir"),
            "scheme": record.get("label"), "address": record.get("base_url"),
            "revision": record.get("revision") or len(doc.get("history", [])) + 1,
            "since": record.get("deployed_at"),
            "last_health": (f"{last['time']} probe score {last.get('score')}" if last
                            else f"{record.get('deployed_at')} deploy health check"),
            "quality_score": state.quality_score if state else None,
            "running": _running(record)})
    return rows


def _running(record: dict) -> bool | None:
    """Whether a local deployment's server process is alive (None: not a local server, or
    a record too incomplete to tell)."""
    if record.get("backend", "local") != "local":
        return None
    try:
        return server_of(record).alive()
    except (KeyError, TypeError):
        return None


def stop_deployment(name: str, registry: DeploymentRegistry | None = None) -> dict:
    """Stop one deployment's server and its nginx; the exporter drops its series with its
    record. The others keep serving. An unknown name is refused, naming the live ones."""
    registry = registry or DeploymentRegistry()
    record = registry.stop(name)
    if record is None:
        live = [r["name"] for r in deployment_rows(registry)]
        raise InputError("quantflow stop NAME", f"no deployment named {name!r} is live here "
                         f"(live: {', '.join(live) or 'none'})",
                         "`quantflow deployments` lists them; `quantflow stop` with no name stops them all")
    return record
