"""Does quant.group_size divide every quantized Linear's input width?

A group of `group_size` input columns shares one scale, so a width that is not a multiple
of it leaves a ragged last group: llm-compressor fails deep inside quantize (or packs
something vLLM's grouped kernels refuse). The widths come from config.json, so this is
checked before any stage loads the model.
"""

from __future__ import annotations

from quantflow.config.quant import ALLOWED_BITS, ALLOWED_GROUP_SIZES, QuantConfig


def input_widths(model_config: dict) -> dict[str, int]:
    """The input widths of a decoder's Linear layers, by the config key they come from:
    q/k/v, gate/up and lm_head read hidden_size; o_proj reads heads x head_dim; down_proj
    reads intermediate_size (and an MoE expert's down_proj moe_intermediate_size)."""
    cfg = model_config.get("text_config") or model_config  # multimodal checkpoints nest it
    widths: dict[str, int] = {}
    hidden = cfg.get("hidden_size")
    if isinstance(hidden, int):
        widths["hidden_size"] = hidden
        heads = cfg.get("num_attention_heads")
        head_dim = cfg.get("head_dim") or (hidden // heads if isinstance(heads, int) and heads else None)
        if isinstance(heads, int) and isinstance(head_dim, int):
            widths["num_attention_heads x head_dim"] = heads * head_dim
    for key in ("intermediate_size", "moe_intermediate_size"):
        if isinstance(cfg.get(key), int):
            widths[key] = cfg[key]
    return widths


def group_size_problem(quant: QuantConfig, model_config: dict) -> tuple[str, str] | None:
    """(why, fix) when quant.group_size cannot group this model's layers; None when it can."""
    g = quant.group_size
    if quant.method not in ALLOWED_BITS or g <= 0:
        return None
    widths = input_widths(model_config)
    ragged = {k: w for k, w in widths.items() if w % g}
    if not ragged:
        return None
    fits = [s for s in ALLOWED_GROUP_SIZES if s > 0 and all(w % s == 0 for w in widths.values())]
    choice = f"quant.group_size: {max(fits)}" if fits else "quant.group_size: -1 (one scale per output channel)"
    why = (f"{g} does not divide the input width of every quantized layer: "
           + ", ".join(f"{k} {w} ({w} % {g} = {w % g})" for k, w in ragged.items()))
    return why, f"set {choice}, which divides {', '.join(f'{k} {w}' for k, w in widths.items())}"
