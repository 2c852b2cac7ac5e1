"""Send a stage to a work pool (as a run of the quantflow-stage deployment) and wait."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel

from quantflow.errors import StageError
from quantflow.storage.store import ArtifactStore

log = logging.getLogger("quantflow.pipeline")

# The deployment of flows/stages.py's stage_flow, one per work pool. The name lives here so
# that stages.py imports this module and not the other way round.
STAGE_DEPLOYMENT = "quantflow-stage"


def jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.model_dump(mode="json") if isinstance(v, BaseModel) else v) for k, v in kwargs.items()}


def deployment_name(pool: str) -> str:
    return f"{STAGE_DEPLOYMENT}/{pool}"


def dispatch_stage(stage: str, pool: str, output_uri: str, kwargs: dict[str, Any], refresh: bool,
                   timeout_s: float) -> dict[str, Any]:
    from prefect.concurrency.sync import concurrency
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    log.info("%s: dispatching to work pool %s", stage, pool)
    # One slot of the pool's global concurrency limit per GPU stage, so a GPU class is
    # never asked to hold more models than it has GPUs (limits are created by `make up`).
    with concurrency(pool, occupy=1, strict=False):
        try:
            run = run_deployment(name=deployment_name(pool), timeout=timeout_s,
                                 parameters={"stage": stage, "output_uri": output_uri,
                                             "inputs": jsonable(kwargs), "refresh": refresh})
        except ObjectNotFound:
            raise StageError(stage, f"placement.pools sends {stage} to pool {pool!r}, but the Prefect "
                             f"server has no deployment {deployment_name(pool)}",
                             "register the deployments (make up), or remove placement.pools to run "
                             "every stage in this process") from None
        state = run.state
        if state is not None and not state.is_final():
            # Timed out: stop the remote run too, or the GPU stays busy after the slot is freed.
            _cancel(run.id)
            raise StageError(stage, f"the {stage} run on pool {pool} (flow run {run.id}) did not finish "
                             f"within placement.stage_timeout_s={timeout_s:.0f}s; it was cancelled",
                             "raise placement.stage_timeout_s, or check that a worker polls the pool")
    if state is None or not state.is_completed():
        raise StageError(stage, f"the {stage} run on pool {pool} (flow run {run.id}) ended "
                         f"{state.name if state else 'without a state'}: "
                         f"{state.message if state else ''}",
                         "see that flow run's logs in the Prefect UI")
    payload = ArtifactStore(output_uri).read_json(f"_dispatch/{stage}.json")
    if payload.get("flow_run_id") != str(run.id):
        raise StageError(stage, f"{output_uri}/_dispatch/{stage}.json was written by another run",
                         "is another pipeline writing to the same output_dir?")
    payload["work_pool"] = run.work_pool_name
    return payload


def _cancel(run_id) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Cancelling(message="quantflow: stage timed out"), force=True)
