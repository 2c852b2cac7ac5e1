"""Operating one deployment of many from the Prefect UI or API: roll it back, stop it.

Deployed as `rollback` and `stop-deployment` (deployments/prefect.yaml); the rollback
deployment's trigger runs it on a critical monitoring alert of a deployment whose
monitor.auto_rollback is on. Both do what `quantflow rollback NAME` and `quantflow stop
NAME` do, on the worker's machine (its $QUANTFLOW_STATE_DIR).
"""

from __future__ import annotations

import re

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from quantflow.monitoring.deployments import stop_deployment
from quantflow.tasks.rollback import rollback_deployment


@flow(name="rollback", log_prints=True)
def rollback(name: str, to_revision: int | None = None, reason: str = "requested from Prefect") -> dict:
    """Release an earlier revision of deployment `name` again at its address (default: the
    newest earlier revision with another checkpoint that was never rolled back from)."""
    record = rollback_deployment(name, to_revision, reason)
    done = record["rollback"]
    create_markdown_artifact(
        # Artifact keys allow lowercase letters, digits and dashes only.
        key=re.sub(r"[^a-z0-9-]+", "-", f"{name}-rollback".lower()),
        description=f"{name}: rolled back to revision {done['to_revision']}",
        markdown=(f"**{name}**: revision {done['from_revision']} → revision {done['to_revision']} "
                  f"({record['label']}), live as revision {record['revision']} at {record['base_url']}\n\n"
                  f"Reason: {reason}"))
    return {k: record[k] for k in ("name", "revision", "label", "base_url", "rollback")}


@flow(name="stop-deployment", log_prints=True)
def stop_deployment_flow(name: str) -> dict:
    """Stop one deployment's server and nginx; the others keep serving."""
    record = stop_deployment(name)
    print(f"stopped {name} (revision {record.get('revision')}, {record.get('base_url')})")
    return {"name": name, "revision": record.get("revision"), "address": record.get("base_url")}
