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


def layer_shapes(model_dir: Path, ignore: list[str]) -> dict[str, tuple[int, int]]:
    """{module name: (output, input) width} of every 2-D weight that quantization would
    target, from the safetensors headers (no tensor is read). Fused 3-D expert tensors are
    left to the config fallback: their axis order differs between families."""
    from quantflow.storage.checkpoints import read_safetensors_header, shard_files

    shapes: dict[str, tuple[int, int]] = {}
    for shard in shard_files(model_dir):
        for key, info in read_safetensors_header(shard).items():
            if key == "__metadata__" or not key.endswith(".weight") or _NOT_LINEAR.search(key):
                continue
            shape = info.get("shape") or []
            module = key.removesuffix(".weight")
            if len(shape) == 2 and not _ignored(module, ignore):
                shapes[module] = (int(shape[0]), int(shape[1]))
    return shapes


def layer_input_widths(model_dir: Path, ignore: list[str]) -> dict[str, int]:
    return {name: shape[1] for name, shape in layer_shapes(model_dir, ignore).items()}


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


FP8_BLOCK = 128  # compressed-tensors' FP8_BLOCK preset: 128 x 128 weight blocks


def block_problem(quant: QuantConfig, model_dir: Path | None) -> tuple[str, str] | None:
    """FP8 block quantization: vLLM refuses a layer whose output width is not a multiple of
    the block (`Weight output_partition_size = 64 is not divisible by weight quantization
    block_n = 128`) when the server loads, after quantize and validate. Checked from the
    checkpoint's own shapes before any stage."""
    if not (quant.method == "fp8" and quant.fp8_scheme == "block") or model_dir is None \
            or not any(Path(model_dir).glob("*.safetensors")):
        return None
    from quantflow.storage.checkpoints import read_config
    from quantflow.quantization.architecture import full_precision_modules

    ignore = [*quant.ignore, *full_precision_modules(read_config(Path(model_dir)))]
    ragged = {name: shape for name, shape in layer_shapes(Path(model_dir), ignore).items()
              if shape[0] % FP8_BLOCK or shape[1] % FP8_BLOCK}
    if not ragged:
        return None
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, shape in sorted(ragged.items()):
        by_shape.setdefault(shape, []).append(name)
    listed = ", ".join(f"{names[0]}" + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")
                       + f" is {shape[0]} x {shape[1]}" for shape, names in by_shape.items())
    return (f"fp8 block quantization uses {FP8_BLOCK} x {FP8_BLOCK} blocks, and vLLM refuses layers whose "
            f"widths are not multiples of {FP8_BLOCK}: {listed}",
            "use fp8_scheme: dynamic (per channel), or keep those layers in full precision with quant.ignore")
