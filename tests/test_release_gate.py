"""The release gate at deploy: what is refused before any server could start.

These tests never need vLLM. They deploy with a serving interpreter that does not exist,
so they run whether or not the serving environment is installed, and a gate check moved
after the serving-environment check would fail them (they would get "make serve-env"
instead of the gate's reason).
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import yaml

from helpers import CPU_SERVING, release_copy
from quantflow.errors import StageError
from quantflow.serving.registry import DeploymentRegistry
from quantflow.tasks.deploy import deploy_model

pytestmark = [pytest.mark.slow]
NO_SERVER = CPU_SERVING.model_copy(update={"serving_python": "/nonexistent/quantflow-serve/bin/python"})


def test_edited_report_is_refused(validated_served, tmp_path):
    out, quantized, verdict = release_copy(validated_served, tmp_path)
    report = json.loads((out / "validation_report.json").read_text())
    report["checks"][0]["quantized"] = report["checks"][0]["baseline"]  # "fix" a number
    (out / "validation_report.json").write_text(json.dumps(report, indent=2) + "\n")
    with pytest.raises(StageError, match="was modified after the validate stage wrote it"):
        deploy_model(NO_SERVER, quantized, verdict, str(out), "edited")
    assert DeploymentRegistry().active("edited") is None


def test_model_card_is_generated_and_an_edited_card_is_refused(validated_served, tmp_path):
    """validate writes quantized_model/README.md from its report; the gate refuses a card
    that differs from it (the card, like the report, is bound by sha256)."""
    out, quantized, verdict = release_copy(validated_served, tmp_path)
    card = out / "quantized_model" / "README.md"
    text = card.read_text()
    assert verdict.card_sha256 == hashlib.sha256(text.encode()).hexdigest()
    meta = yaml.safe_load(text.split("---", 2)[1])
    report = json.loads((out / "validation_report.json").read_text())
    assert meta["base_model"] == report["model"] and "quantized" in meta["tags"]
    assert "Not measured (validation.performance.enabled is false)." in text
    card.write_text(text.replace("**PASS**", "**PASS** (reviewed)"))
    with pytest.raises(StageError, match="model card .*README.md was modified after the validate stage"):
        deploy_model(NO_SERVER, quantized, verdict, str(out), "edited-card")
    card.unlink()
    with pytest.raises(StageError, match="model card .*README.md is missing"):
        deploy_model(NO_SERVER, quantized, verdict, str(out), "no-card")
    assert DeploymentRegistry().active("edited-card") is None and DeploymentRegistry().active("no-card") is None


def test_missing_report_and_report_for_another_checkpoint_are_refused(validated_served, tmp_path):
    out, quantized, verdict = release_copy(validated_served, tmp_path)
    other = verdict.model_copy(update={"checkpoint_sha256": "0" * 64})
    with pytest.raises(StageError, match="for a different checkpoint"):
        deploy_model(NO_SERVER, quantized, other, str(out), "other")
    with pytest.raises(StageError, match="no validation report"):
        deploy_model(NO_SERVER, quantized, None, str(out), "none")
    os.remove(out / "validation_report.json")
    with pytest.raises(StageError, match="is missing: refusing to deploy"):
        deploy_model(NO_SERVER, quantized, verdict, str(out), "missing")


def test_missing_serving_environment_says_how_to_install(validated_served, tmp_path):
    out, quantized, verdict = release_copy(validated_served, tmp_path)
    with pytest.raises(StageError, match="make serve-env"):
        deploy_model(NO_SERVER, quantized, verdict, str(out), "noenv")
    assert DeploymentRegistry().active("noenv") is None
