"""Scheme signatures: the one predicted from a quant config before quantizing (flow start)
must be the one read from the checkpoint it produces (deploy pre-flight), or the two checks
would measure different things. And how a served answer is compared with the golden set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantflow.config import CompletionCheck, QuantConfig
from quantflow.serving.health import answer_matches, expectation, golden_answer, golden_answers
from quantflow.serving.schemes import Scheme, catalog, scheme_for


def _saved_scheme(quantized_dir) -> Scheme:
    saved = json.loads((quantized_dir / "config.json").read_text())["quantization_config"]
    scheme = Scheme.from_quantization_config(saved)
    assert scheme is not None
    return scheme


@pytest.mark.parametrize("quant", [
    {"method": "rtn", "bits": 4, "group_size": 128},
    {"method": "rtn", "bits": 4, "group_size": 128, "sym": False},
    {"method": "fp8", "fp8_scheme": "dynamic"},
    {"method": "w8a16"},
])
def test_predicted_scheme_is_the_checkpoints_scheme(quant, validated_served, tmp_path):
    """Data-free schemes here (instant); a calibrated one below."""
    from quantflow.tasks.quantize import quantize_model

    q = QuantConfig.model_validate(quant)
    quantize_model(q, validated_served["checkpoint"], None, str(tmp_path))
    saved = _saved_scheme(tmp_path / "quantized_model")
    assert saved == scheme_for(q), (saved.label, scheme_for(q).label)


def test_predicted_scheme_of_the_served_demo_checkpoint(validated_served):
    """GPTQ W4A16 on AVX-512 hosts, W8A8 (SmoothQuant + GPTQ) on AVX2: calibrated methods."""
    q = validated_served["config"].quant
    saved = _saved_scheme(Path(validated_served["quantized"].uri))
    assert saved == scheme_for(q), (saved.label, scheme_for(q).label)


def test_catalog_schemes_are_distinct_and_labelled():
    schemes = {name: scheme_for(q) for name, q in catalog().items()}
    assert len({s.key for s in schemes.values()}) == len(schemes)
    assert schemes["w4a16"].label == "W4A16 (int, group 128, sym)"
    assert schemes["w8a8-int8"].label == "W8A8 (int, per channel, sym, dynamic activations)"
    assert schemes["fp8-static"].static_activations and not schemes["fp8-dynamic"].static_activations
    assert scheme_for(QuantConfig(method="recipe", recipe="configs/recipes/w4a16-mixed.yaml")) is None


GOLDEN = [{"prompt": "evaluated when the", "max_tokens": 4, "answer": '\n   "except"'}]


def test_answers_are_compared_with_the_baselines_first_word():
    check = CompletionCheck(prompt="evaluated when the", max_tokens=4)
    ref = golden_answer(GOLDEN, check)
    assert ref == '\n   "except"'
    assert answer_matches(' "except" and', None, ref)
    assert not answer_matches(" function objects", None, ref)
    assert not answer_matches("", None, ref)
    # Another length is another answer: no golden for it, so any non-empty text passes.
    other = CompletionCheck(prompt="evaluated when the", max_tokens=8)
    assert golden_answer(GOLDEN, other) is None and answer_matches("x", None, None)
    assert "no golden answer" in expectation(other, GOLDEN)
    # A curated expectation wins over the golden answer.
    assert answer_matches("function objects", "function", ref)
    assert not answer_matches('"except"', "function", ref)


def test_the_validated_models_own_answer_is_accepted_too():
    """Validation records the quantized model's greedy answers; a served answer may start
    like the baseline's or like the validated model's, and like nothing else."""
    both = [*GOLDEN, {"prompt": "evaluated when the", "max_tokens": 4, "answer": " function objects",
                      "source": "quantized"}]
    check = CompletionCheck(prompt="evaluated when the", max_tokens=4)
    refs = golden_answers(both, check)
    assert refs == ['\n   "except"', " function objects"] and golden_answer(both, check) == refs[0]
    assert answer_matches(' "except" and', None, refs) and answer_matches("function calls", None, refs)
    assert not answer_matches("the class", None, refs) and not answer_matches("", None, refs)
    assert "'function'" in expectation(check, both) and "'\"except\"'" in expectation(check, both)
