"""Faults the pipeline must survive or refuse clearly (issue 12): stage time limits."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from quantflow.errors import StageError
from quantflow.flows.pipeline import quantize_pipeline

pytestmark = [pytest.mark.slow]


def test_stage_timeout_stops_the_stage_once_and_names_the_setting(prefect_server, config_factory):
    """placement.stage_timeout_s is enforced in this process: stage 1 (several seconds on
    the demo model) is stopped after 1 s, not retried, and the error names the stage and
    the setting; nothing is deployed, and a rerun with time enough computes stage 1 afresh."""
    cfg = config_factory(placement={"stage_timeout_s": 1}, validation={"lm_eval": {"enabled": False}},
                         deploy={"enabled": False})
    out = Path(cfg.output_uri)
    start = time.monotonic()
    state = quantize_pipeline(config=cfg, return_state=True)
    elapsed = time.monotonic() - start
    assert state.is_failed()
    with pytest.raises(StageError, match=r"\[checkpoint\] ran longer than placement.stage_timeout_s=1s"):
        state.result()
    assert elapsed < 30, elapsed  # one attempt: the transient-fault retries wait 5 s, then 30 s
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert summary["outcome"] == "failed" and summary["failed_stage"] == "checkpoint"
    assert not (out / "deployment.json").exists() and not (out / "validation_report.json").exists()

    again = quantize_pipeline(config=cfg.model_copy(update={"placement": cfg.placement.model_copy(
        update={"stage_timeout_s": 600})}), return_state=True)
    assert again.is_completed(), again.message
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert summary["cache_hits"] == [] and summary["verdict"] == "pass"
