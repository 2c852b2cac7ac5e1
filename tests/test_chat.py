"""A chat model end to end: calibrated on conversations rendered with its chat template,
validated on plain text, deployed with a chat health check and chat probes.

The fixture is a small dense Qwen3 (a non-Llama architecture) with a ChatML template,
trained on the demo corpus and on conversations cut from it (quantflow/demo/fixtures.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_config, needs_serving
from helpers import stop_deployment

pytestmark = [pytest.mark.slow]

CHAT = [{"role": "system", "content": "You explain the Python language reference."},
        {"role": "user", "content": "Continue: The for statement"}]


def test_chat_calibration_renders_the_template(moe_fixture, tmp_path):
    """The calibration tokens are the conversations as the model sees them: the template's
    own turn markers are in the samples, and the text of the turns follows them."""
    from transformers import AutoTokenizer

    from quantflow.config import CalibrationConfig
    from quantflow.tasks.calibration import chat_documents

    model = moe_fixture("chat")
    tok = AutoTokenizer.from_pretrained(model)
    cfg = CalibrationConfig.model_validate({"source": {"dataset": str(model.parent / "conversations.jsonl"),
                                                       "format": "chat"}, "num_samples": 8, "seq_len": 64})
    docs = chat_documents(cfg, tok)
    first = json.loads((model.parent / "conversations.jsonl").read_text().splitlines()[0])["messages"]
    assert docs[0].startswith("<|im_start|>system\n" + first[0]["content"] + "<|im_end|>")
    ids = torch.tensor(tok(docs[0], add_special_tokens=False)["input_ids"])
    assert int((ids == tok.convert_tokens_to_ids("<|im_start|>")).sum()) == len(first)


@needs_serving
@pytest.mark.serving
def test_chat_model_calibrates_validates_and_deploys_with_chat_probes(moe_fixture, prefect_server, tmp_path):
    from quantflow.flows.pipeline import quantize_pipeline

    model = moe_fixture("chat")
    out = tmp_path / "run"
    cfg = make_config(out, "chat-model", model={"id": str(model)},
                      calibration={"source": {"dataset": str(model.parent / "conversations.jsonl"),
                                              "format": "chat"}, "num_samples": 32, "seq_len": 128},
                      quant={"method": "w8a8"},
                      validation={"perplexity": {"source": {"dataset": ".cache/demo/data/heldout.jsonl"},
                                                 "window": 128},
                                  "consistency": {"prompts": ["The for statement"], "max_new_tokens": 8,
                                                  "kl_tokens": 512, "max_kl": 0.1},
                                  "lm_eval": {"enabled": False}},
                      # float32, as validate computed the answers the health check compares
                      # with: on an AVX2 host (no native bf16) this model's greedy answer to
                      # CHAT flips in bfloat16 ("after the" served, "a function defini" in
                      # float32, measured on an AMD EPYC without AVX-512).
                      deploy={"dtype": "float32", "health": {"messages": CHAT, "max_tokens": 4}},
                      monitor={"probes": [{"messages": CHAT, "max_tokens": 4},
                                          {"prompt": "evaluated when the", "max_tokens": 4}]})
    try:
        state = quantize_pipeline(config=cfg, return_state=True)
        assert state.is_completed(), state.message
        baseline = json.loads((out / "baseline_metrics.json").read_text())["metrics"]
        chat_golden = [g for g in baseline["golden"] if g.get("messages")]
        assert chat_golden and chat_golden[0]["messages"] == CHAT and chat_golden[0]["answer"].strip()
        deployment = json.loads((out / "deployment.json").read_text())
        assert deployment["health"]["prompt"].startswith("chat:"), deployment["health"]
        assert deployment["served_fidelity"]["passed"], deployment["served_fidelity"]
        from quantflow.monitoring.monitor import state_uri
        from quantflow.monitoring.state import load_state
        from quantflow.storage.store import ArtifactStore

        state = load_state(ArtifactStore(state_uri(deployment, cfg.monitor)), cfg.name)
        chat_probe = [r for r in state.history if r["prompt"].startswith("chat:")]
        assert chat_probe and chat_probe[-1]["score"] == 1.0 and "error" not in chat_probe[-1], chat_probe
    finally:
        stop_deployment(cfg.name)
