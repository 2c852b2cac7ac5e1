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
    assert summary["stages"]["checkpoint"]["attempts"] == 1 and summary["stages"]["checkpoint"]["state"] == "Failed"
    assert not (out / "deployment.json").exists() and not (out / "validation_report.json").exists()

    again = quantize_pipeline(config=cfg.model_copy(update={"placement": cfg.placement.model_copy(
        update={"stage_timeout_s": 600})}), return_state=True)
    assert again.is_completed(), again.message
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert summary["cache_hits"] == [] and summary["verdict"] == "pass"


def test_validate_refuses_a_baseline_changed_after_stage_one(tmp_path, demo_dir):
    """The verdict compares against stage 1's numbers: baseline_logprobs.pt (its sha256 is
    in baseline_metrics.json) or baseline_metrics.json (its digest is in the checkpoint
    manifest) edited after stage 1 is refused, naming the file; no report is written."""
    import torch

    from conftest import make_config
    from quantflow.config import QuantConfig
    from quantflow.flows.pipeline import golden_prompts
    from quantflow.tasks.checkpoint import prepare_checkpoint
    from quantflow.tasks.quantize import quantize_model
    from quantflow.tasks.validate import validate_model

    out = tmp_path / "tamper"
    cfg = make_config(out, "tamper", validation={
        "perplexity": {"source": {"dataset": ".cache/demo/data/heldout.jsonl"}, "window": 128},
        "lm_eval": {"enabled": False}})
    ckpt = prepare_checkpoint(cfg.model, cfg.validation.for_baseline(), str(out),
                              golden_prompts=golden_prompts(cfg))
    quant = quantize_model(QuantConfig(method="rtn"), ckpt, None, str(out))

    logprobs = out / "baseline_logprobs.pt"
    original = logprobs.read_bytes()
    lp = torch.load(logprobs)
    lp[0, 0] += 1.0
    torch.save(lp, logprobs)
    with pytest.raises(StageError, match=r"baseline_logprobs.pt was modified after it was written"):
        validate_model(cfg.validation, ckpt, quant, str(out))
    assert not (out / "validation_report.json").exists()
    logprobs.write_bytes(original)

    metrics = out / "baseline_metrics.json"
    doc = json.loads(metrics.read_text())
    doc["metrics"]["perplexity"]["perplexity"] *= 1.5  # a flattering baseline
    metrics.write_text(json.dumps(doc))
    with pytest.raises(StageError, match=r"baseline_metrics.json was modified after stage 1 wrote it"):
        validate_model(cfg.validation, ckpt, quant, str(out))
    assert not (out / "validation_report.json").exists()
