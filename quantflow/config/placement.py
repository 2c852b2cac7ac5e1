"""Where stages run: one process (embedded default) or Prefect work pools per GPU class."""

from __future__ import annotations

from pydantic import Field, field_validator

from quantflow.config.base import StrictModel

DISPATCHABLE = ("checkpoint", "calibration", "quantize", "validate")


class PlacementConfig(StrictModel):
    pools: dict[str, str] = {}
    '''Work pool per stage, e.g. {"quantize": "gpu-h100", "validate": "gpu-a100"}: the stage runs
    as a run of the quantflow-stage/<pool> deployment (`make up` registers them). Stages not
    named, and deploy/monitor, run in the orchestrating flow's process.'''
    stage_timeout_s: float = Field(default=6 * 3600, gt=0,
                                   title="Dispatched stage timeout (s)", examples=[21600, 86400])
    """Seconds to wait for a dispatched stage run; then it is cancelled and the pipeline fails."""
    retry_delays_s: list[float] = Field(default=[5.0, 30.0], max_length=10,
                                        title="Retry delays (s)", examples=[[5.0, 30.0]])
    """Seconds before each retry of an in-process stage that failed with a transient fault
    (network, hub, storage 5xx/429): one entry per retry, [] for none. Configuration and
    integrity errors are never retried. Dispatched stages use the defaults."""

    @field_validator("retry_delays_s")
    @classmethod
    def _non_negative(cls, delays: list[float]) -> list[float]:
        if any(d < 0 for d in delays):
            raise ValueError(f"placement.retry_delays_s: {delays} has a negative delay; give seconds "
                             "(>= 0) before each retry, e.g. [5, 30]")
        return delays

    @field_validator("pools")
    @classmethod
    def _known_stages(cls, pools: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(pools) - set(DISPATCHABLE))
        if unknown:
            raise ValueError(f"placement.pools: {', '.join(unknown)} cannot be sent to a pool; allowed "
                             f"stages: {', '.join(DISPATCHABLE)} (deploy runs where the pipeline runs)")
        return pools
