"""What a model's architecture asks of quantization, read from its config.json.

Mixture-of-experts routers must stay in full precision: vLLM builds router gates and
shared-expert gates unquantized (ReplicatedLinear without a quant config) and refuses or
misreads a checkpoint that quantized them. Most families' routers are not nn.Linear and are
skipped anyway; Qwen2-MoE's `shared_expert_gate` and some families' `gate` are Linear. The
patterns are added to the recipe's ignore list for MoE models, so the recipe saved next to
the checkpoint records them.
"""

from __future__ import annotations

EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
ROUTER_IGNORE = ["re:.*mlp\\.gate$", "re:.*shared_expert_gate$", "re:.*block_sparse_moe\\.gate$",
                 "re:.*router$"]


def text_config(model_config: dict) -> dict:
    return model_config.get("text_config") or model_config  # multimodal checkpoints nest it


def expert_count(model_config: dict) -> int:
    cfg = text_config(model_config)
    return max((int(cfg[k]) for k in EXPERT_COUNT_KEYS if isinstance(cfg.get(k), int)), default=0)


def is_moe(model_config: dict) -> bool:
    return expert_count(model_config) > 1


def full_precision_modules(model_config: dict | None) -> list[str]:
    """Module patterns kept unquantized because of the architecture (not the user's choice)."""
    return list(ROUTER_IGNORE) if model_config and is_moe(model_config) else []


def describe(model_config: dict) -> str:
    """'Qwen3MoeForCausalLM, 8 experts (top-2)' — for logs, reports and errors."""
    cfg = text_config(model_config)
    arch = (model_config.get("architectures") or [model_config.get("model_type", "unknown")])[0]
    n = expert_count(model_config)
    return f"{arch}, {n} experts (top-{cfg.get('num_experts_per_tok', '?')})" if n > 1 else arch
