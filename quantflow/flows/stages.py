"""Run one stage: in this process, or dispatched to the work pool the config names.

In-process stages are Prefect tasks (cached across runs). A dispatched stage runs as the
`quantflow-stage` flow deployment on its pool's worker (e.g. gpu-h100), holding a slot
of that pool's global concurrency limit; it writes its manifest to the artifact store,
where this process reads it back (Prefect results never carry large data).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from prefect import flow
from prefect.task_engine import TaskRunTimeoutError
from prefect.runtime import flow_run
from prefect.states import State
from pydantic import BaseModel

from quantflow.errors import DiskFullError, StageError
from quantflow.flows.dispatch import STAGE_DEPLOYMENT, dispatch_stage
from quantflow.profiling import measure
from quantflow.storage.artifacts import changed_outputs, marker
from quantflow.storage.manifests import (CalibrationManifest, CheckpointManifest, Manifest, QuantizedManifest,
                                         ValidationManifest)
from quantflow.storage.store import ArtifactStore, is_disk_full
from quantflow.tasks.calibration import calibration_task
from quantflow.tasks.checkpoint import checkpoint_task
from quantflow.tasks.policy import attempts_of
from quantflow.tasks.quantize import quantize_task
from quantflow.tasks.validate import validate_task

log = logging.getLogger("quantflow.pipeline")

# stage -> (task, manifest type, files whose absence forces a recompute)
CACHED_STAGES: dict[str, tuple[Any, type[Manifest], tuple[str, ...]]] = {
    "checkpoint": (checkpoint_task, CheckpointManifest, ("baseline_metrics.json",)),
    "calibration": (calibration_task, CalibrationManifest, ("calibration_data.pt",)),
    "quantize": (quantize_task, QuantizedManifest, ("quantized_model/config.json",)),
    "validate": (validate_task, ValidationManifest, ("validation_report.json",)),
}
# Stages that run in this process take turns. llm-compressor keeps one global session per
# process, and model loading patches module construction process-wide (meta-device init):
# two stages loading models in threads of one process (a search's candidates) corrupted each
# other and every later run in that process ("Cannot copy out of meta tensor", measured in
# CI). Dispatched stages run in their workers' own processes and do not take this lock.
_IN_PROCESS = threading.Lock()


@dataclass
class StageRecord:
    stage: str
    cache_hit: bool = False
    wall_s: float = 0.0
    peak_rss_mib: float | None = None
    pool: str | None = None
    state: str = "Completed"
    # Times the stage's task ran in this run: 1 + transient-fault retries. A cache hit counts
    # 1; a cache hit recomputed because its files changed counts the recompute's attempts.
    attempts: int = 1
    extra: dict = field(default_factory=dict)


def _missing_outputs(store: ArtifactStore, name: str, files: tuple[str, ...]) -> list[str]:
    return [f"{store.uri(f)} is missing" for f in (*files, marker(name)) if not store.exists(f)]


def run_cached_stage(name: str, output_uri: str, pool: str | None = None,
                     timeout_s: float = 6 * 3600, retry_delays_s: list[float] | None = None,
                     **kwargs: Any) -> tuple[Manifest, StageRecord]:
    """A failure carries the stage's record (`err.stage_record`, state Failed, its attempts)
    so pipeline_summary.json of a failed run shows how often the failing stage ran."""
    _, manifest_type, _ = CACHED_STAGES[name]
    record = StageRecord(stage=name, pool=pool)
    if pool:
        start = time.perf_counter()
        payload = dispatch_stage(name, pool, output_uri, kwargs, False, timeout_s)
        record.wall_s = round(time.perf_counter() - start, 3)
        record.cache_hit = payload["cache_hit"]
        record.peak_rss_mib = payload["usage"].get("peak_rss_mib")
        record.attempts = payload.get("attempts", 1)
        record.extra = {"flow_run_id": payload["flow_run_id"], "work_pool": payload["work_pool"]}
        return manifest_type.model_validate(payload["manifest"]), record
    start = time.perf_counter()
    try:
        with _IN_PROCESS, measure() as usage:
            manifest, hit, state_name, attempts = run_stage_task(name, output_uri, False, kwargs,
                                                                 timeout_s, retry_delays_s)
    except Exception as err:
        record.state, record.attempts = "Failed", getattr(err, "attempts", 1)
        record.wall_s = round(time.perf_counter() - start, 3)
        err.stage_record = record  # type: ignore[attr-defined]
        raise
    record.wall_s, record.peak_rss_mib = usage.wall_s, usage.peak_rss_mib
    record.cache_hit, record.state, record.attempts = hit, state_name, attempts
    return manifest, record


def run_stage_task(name: str, output_uri: str, refresh: bool, kwargs: dict[str, Any],
                   timeout_s: float | None = None, retry_delays_s: list[float] | None = None,
                   ) -> tuple[Manifest, bool, str, int]:
    """Call the stage's task; a cache hit whose files were since deleted, overwritten or
    edited is recomputed. The check comes after the task, not before: a run that waited on
    another run's stage lock must see the files that run wrote (the task records them itself).
    `timeout_s` (placement.stage_timeout_s) stops the stage in this process; it is not retried.
    `retry_delays_s` (placement.retry_delays_s): one delay per retry of a transient fault.
    Returns (manifest, cache hit, state name, attempts); an exception carries `attempts`."""
    task_fn, _, outputs = CACHED_STAGES[name]
    store = ArtifactStore(output_uri)
    task_fn = task_fn.with_options(timeout_seconds=timeout_s) if timeout_s else task_fn
    if retry_delays_s is not None:
        task_fn = task_fn.with_options(retries=len(retry_delays_s), retry_delay_seconds=list(retry_delays_s))
    t = task_fn.with_options(refresh_cache=True) if refresh else task_fn
    state: State = t(output_uri=output_uri, return_state=True, **kwargs)
    attempts = attempts_of(state.state_details.task_run_id)
    manifest = _result(state, name, timeout_s, attempts, output_uri)  # raises the stage's exception when it failed
    hit = state.name == "Cached"
    changed = (_missing_outputs(store, name, outputs) or changed_outputs(store, name, manifest)) if hit else []
    if changed:
        log.warning("%s: cached result no longer matches the files in %s (%s); recomputing", name,
                    output_uri, ", ".join(changed))
        state = task_fn.with_options(refresh_cache=True)(output_uri=output_uri, return_state=True, **kwargs)
        attempts = attempts_of(state.state_details.task_run_id)  # the lookup computed nothing
        manifest, hit = _result(state, name, timeout_s, attempts, output_uri), False
    return manifest, hit, state.name, attempts


def _result(state: State, stage: str, timeout_s: float | None, attempts: int = 1,
            output_uri: str = "") -> Manifest:
    try:
        return state.result()
    except TaskRunTimeoutError:
        err = StageError(stage, f"ran longer than placement.stage_timeout_s={timeout_s:g}s and was "
                         "stopped (not retried)", "raise placement.stage_timeout_s, or send the "
                         "stage to a faster work pool (placement.pools)")
        err.attempts = attempts  # type: ignore[attr-defined]
        raise err from None
    except Exception as err:
        err.attempts = attempts  # type: ignore[attr-defined]
        # A full disk surfaces from our writes (DiskFullError names the file) or from a
        # library's (torch, safetensors): either way the stage wrote no marker, and the
        # message must say "disk full", not a library's errno text.
        if is_disk_full(err) and not isinstance(err, StageError):
            what = err.problem if isinstance(err, DiskFullError) else str(err)
            full = StageError(stage, f"the disk holding output_dir {output_uri} is full ({what})",
                              "free space on that disk, or set output_dir to a folder on a disk "
                              "with room; the stage wrote no marker, so none of its files is "
                              "taken as a result")
            full.attempts = attempts  # type: ignore[attr-defined]
            raise full from err
        raise


@flow(name=STAGE_DEPLOYMENT, log_prints=False)  # see flows/pipeline.py
def stage_flow(stage: str, output_uri: str, inputs: dict[str, Any], refresh: bool = False) -> dict:
    """One cached stage, run where this flow runs (a GPU pool's worker)."""
    manifest, hit, _, attempts = run_stage_task(stage, output_uri, refresh, _typed_inputs(stage, inputs))
    payload = {"manifest": manifest.model_dump(mode="json"), "cache_hit": hit, "attempts": attempts,
               "usage": manifest.usage, "flow_run_id": str(flow_run.get_id())}
    # The orchestrator reads this from the shared store; Prefect results stay small.
    ArtifactStore(output_uri).write_json(f"_dispatch/{stage}.json", payload)
    return payload


def _typed_inputs(stage: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """Rebuild pydantic inputs from JSON parameters using the task's type hints."""
    import typing

    fn = CACHED_STAGES[stage][0].fn
    hints = typing.get_type_hints(fn)
    out = {}
    for key, value in inputs.items():
        hint = hints.get(key)
        for candidate in typing.get_args(hint) or (hint,):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel) and value is not None:
                value = candidate.model_validate(value)
                break
        out[key] = value
    return out

