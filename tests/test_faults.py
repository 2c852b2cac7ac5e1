"""Faults the pipeline must survive or refuse clearly (issue 12): stage time limits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantflow.errors import StageError
from quantflow.flows.pipeline import quantize_pipeline

pytestmark = [pytest.mark.slow]
STAGES = ["checkpoint", "calibration", "quantize", "validate"]


def test_stage_timeout_stops_the_stage_once_and_names_the_setting(prefect_server, config_factory):
    """placement.stage_timeout_s is enforced in this process: the first stage that outlives
    0.3 s (stage 1 loads and evaluates the model: about 1 s on a quiet 2-core host, several
    under load; a warm one can finish it, and then calibration or quantize is the one) is
    stopped, attempted once, and the error names it and the setting; nothing is deployed,
    and a rerun with time enough takes the earlier stages from the cache and computes that
    stage afresh."""
    cfg = config_factory(placement={"stage_timeout_s": 0.3}, validation={"lm_eval": {"enabled": False}},
                         deploy={"enabled": False})
    out = Path(cfg.output_uri)
    state = quantize_pipeline(config=cfg, return_state=True)
    assert state.is_failed()
    with pytest.raises(StageError, match=r"\[(checkpoint|calibration|quantize|validate)\] ran longer than "
                                         r"placement.stage_timeout_s=0.3s and was stopped \(not retried\)") as err:
        state.result()
    stopped = err.value.stage
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert summary["outcome"] == "failed" and summary["failed_stage"] == stopped
    # One attempt: a timeout is not a transient fault (retries would wait 5 s, then 30 s).
    assert summary["stages"][stopped]["attempts"] == 1 and summary["stages"][stopped]["state"] == "Failed"
    assert not (out / "deployment.json").exists() and not (out / "validation_report.json").exists()
    before = STAGES[:STAGES.index(stopped)]

    again = quantize_pipeline(config=cfg.model_copy(update={"placement": cfg.placement.model_copy(
        update={"stage_timeout_s": 600})}), return_state=True)
    assert again.is_completed(), again.message
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert summary["cache_hits"] == sorted(before) and summary["verdict"] == "pass"
    assert summary["stages"][stopped]["cache_hit"] is False


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
