"""Caching and retry rules shared by every stage task.

Cache key = stage name + the stage's inputs (configs and upstream manifests, without
timestamps; recipe files by content) + the checkpoint's fingerprint + tool versions +
quantflow's source code.
Same model revision, same stage config, same tools => cache hit, across flow runs
(Prefect's DEFAULT policy includes the run id and never reuses results across runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import httpx
from prefect.cache_policies import CachePolicy
from pydantic import BaseModel

from quantflow.checkpoints import cheap_fingerprint
import quantflow
from quantflow.config import ModelSpec, QuantConfig
from quantflow.errors import QuantflowError, TransientError
from quantflow.manifests import Manifest
from quantflow.store import digest_of
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


def recipe_digest(quant: QuantConfig) -> str | None:
    """A recipe file is an input by content, not by path."""
    if quant.method == "recipe" and quant.recipe and Path(quant.recipe).is_file():
        return digest_of(Path(quant.recipe).read_text())
    return None


@dataclass
class StageCache(CachePolicy):
    stage: str = ""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        data = {"stage": self.stage, "inputs": key_data(inputs), "versions": tool_versions(),
                "source": code_digest()}
        models = [v for v in inputs.values() if isinstance(v, ModelSpec)]
        data["model_fingerprints"] = [cheap_fingerprint(m) for m in models]
        data["recipes"] = [recipe_digest(v) for v in inputs.values() if isinstance(v, QuantConfig)]
        return f"quantflow-{self.stage}-{digest_of(data)[:32]}"


def is_transient(exc: BaseException | None) -> bool:
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, QuantflowError):
        return False  # configuration, integrity and gate errors do not heal by retrying
    if isinstance(exc, (ConnectionError, TimeoutError, httpx.TransportError)):
        return True
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return isinstance(status, int) and (status >= 500 or status == 429)


def retry_transient(task, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry network, hub and storage faults only."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - an unreadable result is not evidence of a transient fault
        return False
    return is_transient(exc if isinstance(exc, BaseException) else None)


TASK_DEFAULTS: dict[str, Any] = dict(retries=2, retry_delay_seconds=[5, 30],
                                     retry_condition_fn=retry_transient, persist_result=True)


def stage_task_options(stage: str) -> dict[str, Any]:
    return dict(name=stage, cache_policy=StageCache(stage=stage), **TASK_DEFAULTS)
