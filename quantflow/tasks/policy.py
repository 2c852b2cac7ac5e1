"""Caching and retry rules shared by every stage task.

Cache key = stage name + the stage's inputs (configs and upstream manifests, without
timestamps) + the content of every local file or folder those inputs name (data sets,
lm-eval task folders, recipes) + the checkpoint's fingerprint + tool versions +
quantflow's source code.
Same model revision, same stage config, same data, same tools => cache hit, across flow
runs and across concurrent runs (a stage is computed under its cache key's lock) (Prefect's DEFAULT policy includes the run id and never reuses results across runs).
A changed calibration file reaches quantize and validate through the calibration
manifest, which carries the sha256 of the token ids it produced.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import httpx
from prefect.cache_policies import CachePolicy
from prefect.task_engine import TaskRunTimeoutError
from pydantic import BaseModel

import quantflow
from quantflow.storage.checkpoints import cheap_fingerprint
from quantflow.config import LmEvalCheck, ModelSpec, QuantConfig, TextSource
from quantflow.storage.content_digest import DigestMemo, path_digest, task_folder_digest
from quantflow.errors import QuantflowError, TransientError
from quantflow.storage.locks import stage_lock_manager
from quantflow.storage.manifests import Manifest
from quantflow.storage.hashing import digest_of
from quantflow.storage.store import is_transient_storage_fault
from quantflow.versions import tool_versions


def key_data(value: Any) -> Any:
    if isinstance(value, Manifest):
        return value.key_data()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: key_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [key_data(v) for v in value]
    return value


@cache
def code_digest() -> str:
    """Digest of quantflow's whole source: a change to any stage's helpers (recipes,
    evaluation, loading) must invalidate cached results, not only the task module."""
    root = Path(quantflow.__file__).parent
    return digest_of([(str(p.relative_to(root)), p.read_bytes().hex())
                      for p in sorted(root.rglob("*.py"))])


def recipe_digest(quant: QuantConfig, memo: DigestMemo | None = None) -> str | None:
    """A recipe file is an input by content, not by path."""
    if quant.method == "recipe" and quant.recipe and Path(quant.recipe).expanduser().is_file():
        return path_digest(quant.recipe, memo)
    return None


def local_content(value: Any, where: str = "", memo: DigestMemo | None = None) -> dict[str, str]:
    """Content digests of the local files and folders an input names, by dotted location
    ("validation.perplexity.source"). Walks configs and manifests alike, so a TextSource
    nested anywhere is found.

    Hub data sets contribute nothing here: their name, subset, split and data_files are in
    the config dump already. Their resolved revision is not (the pipeline runs with the hub
    offline, and TextSource has no revision to pin), so a data set re-published under the
    same name keeps its cached results.
    """
    memo = memo or DigestMemo()
    found: dict[str, str] = {}

    def add(name: str, digest: str | None) -> None:
        if digest is not None:
            found[name] = digest

    if isinstance(value, TextSource):
        add(where, path_digest(value.dataset, memo))
    elif isinstance(value, LmEvalCheck) and value.include_path:
        add(f"{where}.include_path", task_folder_digest(value.include_path, memo))
    elif isinstance(value, QuantConfig):
        add(f"{where}.recipe", recipe_digest(value, memo))
        if value.method == "prequantized" and value.checkpoint:
            # A checkpoint, fingerprinted as the baseline is (sizes and mtimes, or hub commit).
            add(f"{where}.checkpoint", cheap_fingerprint(ModelSpec(id=value.checkpoint)))
    if isinstance(value, BaseModel):
        children = {name: getattr(value, name) for name in type(value).model_fields}
    elif isinstance(value, dict):
        children = {str(k): v for k, v in value.items()}
    elif isinstance(value, (list, tuple)):
        children = {str(i): v for i, v in enumerate(value)}
    else:
        children = {}
    for name, child in children.items():
        if isinstance(child, (BaseModel, dict, list, tuple)):
            found.update(local_content(child, f"{where}.{name}" if where else name, memo))
    return found


@dataclass
class StageCache(CachePolicy):
    stage: str = ""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        data = {"stage": self.stage, "inputs": key_data(inputs), "versions": tool_versions(),
                "source": code_digest()}
        models = [v for v in inputs.values() if isinstance(v, ModelSpec)]
        data["model_fingerprints"] = [cheap_fingerprint(m) for m in models]
        memo = DigestMemo()
        data["local_content"] = local_content(inputs, memo=memo)
        memo.save()
        return f"quantflow-{self.stage}-{digest_of(data)[:32]}"


def is_transient(exc: BaseException | None) -> bool:
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, TaskRunTimeoutError):
        return False  # placement.stage_timeout_s: a stage that ran out of time would again
    if isinstance(exc, QuantflowError):
        return False  # configuration, integrity and gate errors do not heal by retrying
    if isinstance(exc, (ConnectionError, TimeoutError, httpx.TransportError)):
        return True
    if is_transient_storage_fault(exc):
        return True  # S3 answered 5xx/429 or the connection broke (s3fs raises OSError)
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return isinstance(status, int) and (status >= 500 or status == 429)


# Retries Prefect granted, per task run id. retry_condition_fn is the one hook Prefect calls
# on every failed attempt with the task run in hand, so attempts = 1 + retries granted; read
# (and forgotten) by flows/stages.py once the task run has ended.
_RETRIES: Counter = Counter()
_RETRIES_LOCK = threading.Lock()


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry network, hub and storage faults only."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - an unreadable result is not evidence of a transient fault
        return False
    retry = is_transient(exc if isinstance(exc, BaseException) else None)
    if retry:
        with _RETRIES_LOCK:
            _RETRIES[str(task_run.id)] += 1
    return retry


def attempts_of(task_run_id: Any) -> int:
    """How many times a finished task run in this process ran its stage: 1 + the retries
    retry_transient granted. A cache hit is one attempt (it ran once and found the result)."""
    with _RETRIES_LOCK:
        return 1 + _RETRIES.pop(str(task_run_id), 0)


RETRY_DELAYS_S = (5.0, 30.0)  # placement.retry_delays_s overrides these per run
TASK_DEFAULTS: dict[str, Any] = dict(retries=len(RETRY_DELAYS_S), retry_delay_seconds=list(RETRY_DELAYS_S),
                                     retry_condition_fn=retry_transient, persist_result=True)


def stage_task_options(stage: str) -> dict[str, Any]:
    # SERIALIZABLE: a second run with the same key waits on the first's lock, then reads its
    # committed result instead of computing the stage again (quantflow/storage/locks.py).
    policy = StageCache(stage=stage, isolation_level="SERIALIZABLE", lock_manager=stage_lock_manager())
    return dict(name=stage, cache_policy=policy, **TASK_DEFAULTS)
