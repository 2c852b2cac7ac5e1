"""Every requantize trigger, one at a time (issue 12): each change moves exactly its own part
of the fingerprint, so the requantize flow runs and its log names what changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from quantflow.config import build_config
from quantflow.flows import requantize as rq


def _config(root: Path, recipe: Path):
    data = yaml.safe_load(Path("configs/demo.yaml").read_text())
    data["model"] = {"id": str(root / "model")}
    data["calibration"]["source"] = {"dataset": str(root / "calibration.jsonl")}
    data["validation"]["perplexity"]["source"] = {"dataset": str(root / "heldout.jsonl")}
    data["quant"] = {"method": "recipe", "recipe": str(recipe)}
    data["output_dir"] = str(root / "out")
    return build_config(data, {})


def _changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before if before[k] != after[k])


def test_each_input_triggers_only_its_own_part(tmp_path, demo_model, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(demo_model, model)
    for name in ("calibration", "heldout"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"text": f"{name} text one"}) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n"
                      "      targets: [Linear]\n      ignore: [lm_head]\n      scheme: W8A16\n")
    cfg = _config(tmp_path, recipe)
    base = rq.inputs_fingerprint(cfg)
    assert base == rq.inputs_fingerprint(cfg)  # nothing changed: the nightly run skips

    # The upstream model: a changed config.json (a new revision's files).
    conf = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**conf, "rope_theta": 20000.0}))
    now = rq.inputs_fingerprint(cfg)
    assert _changed(base, now) == ["model"]
    base = now

    for name, part in (("calibration", "calibration"), ("heldout", "heldout")):
        with (tmp_path / f"{name}.jsonl").open("a") as fh:
            fh.write(json.dumps({"text": "one more line"}) + "\n")
        now = rq.inputs_fingerprint(cfg)
        assert _changed(base, now) == [part], name
        base = now

    # The recipe file's content, at the same path, is config.
    recipe.write_text(recipe.read_text().replace("W8A16", "W4A16"))
    now = rq.inputs_fingerprint(cfg)
    assert _changed(base, now) == ["config"]
    base = now

    # A config setting.
    stricter = cfg.validation.consistency.model_copy(update={"max_kl": 0.0123})
    other = cfg.model_copy(update={"validation": cfg.validation.model_copy(update={"consistency": stricter})})
    assert _changed(base, rq.inputs_fingerprint(other)) == ["config"]

    # The toolchain: an llm-compressor upgrade is simulated by the version the flow reads
    # (installing another release is not possible offline); quantflow's own code is real.
    versions = rq.tool_versions()
    monkeypatch.setattr(rq, "tool_versions", lambda: {**versions, "llmcompressor": "99.0"})
    assert _changed(base, rq.inputs_fingerprint(cfg)) == ["toolchain"]
    monkeypatch.setattr(rq, "tool_versions", lambda: versions)
    monkeypatch.setattr(rq, "code_digest", lambda: "another quantflow source tree")
    assert _changed(base, rq.inputs_fingerprint(cfg)) == ["toolchain"]
