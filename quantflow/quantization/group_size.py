"""Does quant.group_size divide every quantized Linear's input width?

A group of `group_size` input columns shares one scale, so a width that is not a multiple
of it leaves a ragged last group: llm-compressor fails deep inside quantize (`unflatten:
Provided sizes [-1, 128] don't multiply up to the size of dim 1 (64)`), or packs something
vLLM's grouped kernels refuse. The widths are read from the checkpoint's own tensor shapes
(safetensors headers), so any architecture is covered: multi-head latent attention's 64-wide
low-rank projections, shared experts, whatever config keys a family uses. Without local
shards (a hub id not yet downloaded) the config keys of the usual families are the fallback.
"""

from __future__ import annotations

import re
from pathlib import Path

from quantflow.config.quant import ALLOWED_BITS, ALLOWED_GROUP_SIZES, QuantConfig

# Tensors that are not quantized Linear weights even when 2-D.
_NOT_LINEAR = re.compile(r"(embed_tokens|embed_in|wte|wpe|embeddings?|norm|ln_\w+)\.weight$")


def input_widths(model_config: dict) -> dict[str, int]:
    """Config-key fallback: q/k/v, gate/up and lm_head read hidden_size; o_proj reads heads x
    head_dim; down_proj reads intermediate_size (an MoE expert's, moe_intermediate_size)."""
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


def _ignored(name: str, ignore: list[str]) -> bool:
    """compressed-tensors' matching: a module name, its last part, or `re:` a regex."""
    for pattern in ignore:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif name == pattern or name.endswith("." + pattern):
            return True
    return False


def layer_input_widths(model_dir: Path, ignore: list[str]) -> dict[str, int]:
    """{module name: input width} of every 2-D weight that quantization would target, from
    the safetensors headers (no tensor is read). Fused 3-D expert tensors are left to the
    config fallback: their axis order differs between families."""
    from quantflow.checkpoints import read_safetensors_header, shard_files

    widths: dict[str, int] = {}
    for shard in shard_files(model_dir):
        for key, info in read_safetensors_header(shard).items():
            if key == "__metadata__" or not key.endswith(".weight") or _NOT_LINEAR.search(key):
                continue
            shape = info.get("shape") or []
            module = key.removesuffix(".weight")
            if len(shape) == 2 and not _ignored(module, ignore):
                widths[module] = int(shape[1])
    return widths


def _by_width(layers: dict[str, int]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for name, w in sorted(layers.items()):
        out.setdefault(w, []).append(name)
    return out


def group_size_problem(quant: QuantConfig, model_config: dict,
                       model_dir: Path | None = None) -> tuple[str, str] | None:
    """(why, fix) when quant.group_size cannot group this model's layers; None when it can.
    With `model_dir` holding safetensors shards, the widths are the tensors' own."""
    g = quant.group_size
    if quant.method not in ALLOWED_BITS or g <= 0:
        return None
    layers: dict[str, int] = {}
    if model_dir is not None and any(Path(model_dir).glob("*.safetensors")):
        layers = layer_input_widths(Path(model_dir), list(quant.ignore))
    extra = {k: w for k, w in input_widths(model_config).items()
             if k == "moe_intermediate_size"} if layers else input_widths(model_config)
    named = {**{f"{names[0]} (and {len(names) - 1} more)" if len(names) > 1 else names[0]: w
                for w, names in _by_width(layers).items()}, **extra}
    widths = set(named.values())
    ragged = {k: w for k, w in named.items() if w % g}
    if not ragged:
        return None
    fits = [s for s in ALLOWED_GROUP_SIZES if s > 0 and all(w % s == 0 for w in widths)]
    choice = f"quant.group_size: {max(fits)}" if fits else "quant.group_size: -1 (one scale per output channel)"
    why = (f"{g} does not divide the input width of every quantized layer: "
           + ", ".join(f"{k} reads {w} ({w} % {g} = {w % g})" for k, w in ragged.items()))
    return why, (f"set {choice}, which divides every input width ({', '.join(map(str, sorted(widths)))}); "
                 "or keep the odd layers in full precision with quant.ignore")
