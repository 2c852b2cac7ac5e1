"""Bring back an earlier revision of a deployment (`quantflow rollback NAME [--to REVISION]`,
the `rollback` Prefect deployment, and its automation on critical monitoring alerts).

A rollback is a release: the earlier revision's checkpoint goes through the deploy stage
again (every file's sha256 against its manifest, the validation report bound to it, the
serving pre-flight, a health check against the baseline's answers) and takes the stable
address through the same graceful nginx switch. The live server keeps serving until the
earlier one has answered, so clients see no failed request. It becomes a new revision
that records which one it brought back, from which, and why.

Without --to, the target is the newest earlier revision with another checkpoint that was
never rolled back from: a second automatic rollback after the first goes further back, or
is refused, instead of bringing back the model just rolled away from.
"""

from __future__ import annotations

import logging

from quantflow.config import DeployConfig, MonitorConfig
from quantflow.errors import InputError, StageError
from quantflow.serving.registry import DeploymentRegistry
from quantflow.storage.manifests import QuantizedManifest, ValidationManifest, now
from quantflow.tasks.deploy import deploy_model

log = logging.getLogger("quantflow.deploy")
FIELD = "quantflow rollback NAME"


def choose_target(doc: dict, to_revision: int | None) -> dict:
    """The history record to bring back; InputError naming what is there otherwise."""
    name, active, history = doc["name"], doc["active"], doc.get("history", [])
    known = ", ".join(str(r.get("revision")) for r in history if r.get("revision")) or "none"
    if to_revision is not None:
        if active and active.get("revision") == to_revision:
            raise InputError(f"{FIELD} --to", f"revision {to_revision} of {name!r} is the one live now",
                             f"name an earlier revision (recorded: {known})")
        found = [r for r in history if r.get("revision") == to_revision]
        if not found:
            raise InputError(f"{FIELD} --to", f"{name!r} has no recorded revision {to_revision} "
                             f"(recorded earlier revisions: {known})",
                             "`quantflow deployments` shows the live revision; the registry keeps the last 10")
        if "release" not in found[0]:
            raise InputError(f"{FIELD} --to", f"revision {to_revision} of {name!r} was deployed before "
                             "quantflow recorded what a rollback needs (its manifests and deploy settings)",
                             "deploy that model again with `quantflow run`")
        return found[0]
    live_sha = (active or {}).get("checkpoint_sha256")
    for record in history:
        if "release" in record and not record.get("rolled_back") and record.get("checkpoint_sha256") != live_sha:
            return record
    live = f"revision {active['revision']} is live" if active else "nothing is live"
    raise InputError(FIELD, f"{name!r} has no previous revision to roll back to ({live}; earlier "
                     f"revisions recorded: {known}, none with another checkpoint that was not rolled back from)",
                     "deploy another model with `quantflow run`, or name a revision with --to")


def rollback_deployment(name: str, to_revision: int | None = None, reason: str = "requested by an operator",
                        registry: DeploymentRegistry | None = None) -> dict:
    """Release an earlier revision of `name` again at its address; returns the new record."""
    registry = registry or DeploymentRegistry()
    if name not in registry.names():
        raise InputError(FIELD, f"no deployment named {name!r} is recorded here "
                         f"(recorded: {', '.join(registry.names()) or 'none'})",
                         "`quantflow deployments` lists the live ones")
    doc = registry.read(name)
    target = choose_target(doc, to_revision)
    active = doc["active"]
    if (target.get("backend") or "local") != "local":
        raise InputError(FIELD, f"revision {target['revision']} of {name!r} runs on the "
                         f"{target['backend']} backend, where quantflow rolls back nothing itself",
                         "roll back with the cluster's own tooling (kubectl rollout undo)")
    release = target["release"]
    came_from = active.get("revision") if active else None
    log.info("rollback: %s revision %s (%s) -> revision %s (%s): %s", name, came_from,
             (active or {}).get("label"), target["revision"], target.get("label"), reason)
    note = {"rollback": {"to_revision": target["revision"], "from_revision": came_from,
                         "reason": reason, "at": now()}}
    try:
        # Back at once: a rollback does not canary the model it returns to.
        deploy = DeployConfig.model_validate({**release["deploy"], "rollout": {"strategy": "blue-green"}})
        record = deploy_model(
            deploy, QuantizedManifest.model_validate(release["quantized"]),
            ValidationManifest.model_validate(release["validation"]) if release["validation"] else None,
            target["output_uri"], name,
            monitor=MonitorConfig.model_validate(target["monitor"]) if target.get("monitor") else None,
            golden=release["golden"], note=note)
    except StageError as err:
        keeps = f"revision {came_from} is left as it was" if active else "nothing was serving"
        raise StageError("rollback", f"revision {target['revision']} of {name!r} could not be brought back; "
                         f"{keeps}. {err.cause}", err.fix) from None
    if came_from is not None:
        with registry.locked(name):
            doc = registry.read(name)
            for entry in doc["history"]:
                if entry.get("revision") == came_from:
                    entry["rolled_back"] = {"by_revision": record["revision"], "reason": reason,
                                            "at": note["rollback"]["at"]}
            registry.write(name, doc)
    log.info("rollback: %s is revision %s again, live as revision %s at %s", name, target["revision"],
             record["revision"], record["base_url"])
    return record
