"""Where stages run: one process (embedded default) or Prefect work pools per GPU class."""

from __future__ import annotations

from pydantic import Field

from quantflow.config.base import StrictModel


class PlacementConfig(StrictModel):
    # Work pool per GPU stage, e.g. {"quantize": "gpu-h100", "validate": "gpu-a100"}.
    # A stage not named runs inside the orchestrating flow's process.
    pools: dict[str, str] = {}
    # Global concurrency limit (slots) per pool, so GPU classes are never oversubscribed.
    gpu_slots: dict[str, int] = Field(default_factory=lambda: {"gpu-a100": 1, "gpu-h100": 1})
    # Seconds to wait for a dispatched stage run before failing the pipeline.
    stage_timeout_s: float = Field(default=6 * 3600, gt=0)
