"""QuantConfig -> llm-compressor recipe YAML (one function per method family).

Recipes are written as YAML text, not built from modifier objects: the text is what is
saved next to the checkpoint and what a user passes to llm-compressor directly to get
the same tensors (tests/test_quantize.py::test_pipeline_equals_direct_llmcompressor).
"""

from __future__ import annotations

from typing import Any

import yaml

from quantflow.config import QuantConfig

# Preset names in compressed-tensors for the fixed-scheme methods.
FIXED_PRESETS = {"w8a16": "W8A16", "nvfp4": "NVFP4A16", "mxfp4": "MXFP4A16"}
FP8_PRESETS = {"dynamic": "FP8_DYNAMIC", "static": "FP8", "block": "FP8_BLOCK"}


def integer_weights(q: QuantConfig) -> dict[str, Any]:
    args: dict[str, Any] = {"num_bits": q.bits, "type": "int", "symmetric": q.symmetric}
    if q.group_size == -1:
        args["strategy"] = "channel"
    else:
        args.update(strategy="group", group_size=q.group_size)
    return args


def _groups(q: QuantConfig) -> dict[str, Any]:
    return {"group_0": {"targets": ["Linear"], "weights": integer_weights(q)}}


def recipe_dict(q: QuantConfig) -> dict[str, Any]:
    m = q.method
    mods: dict[str, Any]
    if m == "gptq":
        mods = {"GPTQModifier": {"ignore": list(q.ignore), "dampening_frac": q.dampening_frac,
                                 "actorder": q.actorder, "config_groups": _groups(q)}}
    elif m == "rtn":
        mods = {"QuantizationModifier": {"ignore": list(q.ignore), "config_groups": _groups(q)}}
    elif m == "awq":
        mods = {"AWQModifier": {"duo_scaling": True},
                "QuantizationModifier": {"ignore": list(q.ignore), "config_groups": _groups(q)}}
    elif m == "w8a8":
        mods = {"SmoothQuantModifier": {"smoothing_strength": q.smoothing_strength},
                "GPTQModifier": {"ignore": list(q.ignore), "dampening_frac": q.dampening_frac,
                                 "targets": ["Linear"], "scheme": "W8A8"}}
    elif m == "fp8":
        mods = {"QuantizationModifier": {"ignore": list(q.ignore), "targets": ["Linear"],
                                         "scheme": FP8_PRESETS[q.fp8_scheme]}}
    elif m in FIXED_PRESETS:
        mods = {"QuantizationModifier": {"ignore": list(q.ignore), "targets": ["Linear"],
                                         "scheme": FIXED_PRESETS[m]}}
    else:
        raise ValueError(f"method {m!r} has no built-in recipe")
    return {"quant_stage": {"quant_modifiers": mods}}


def recipe_yaml(q: QuantConfig) -> str:
    if q.method == "recipe":
        assert q.recipe is not None
        with open(q.recipe) as f:
            return f.read()
    return yaml.safe_dump(recipe_dict(q), sort_keys=False)


def streaming_scheme(q: QuantConfig) -> dict[str, Any] | str | None:
    """The scheme for llm-compressor's model_free_ptq when the method needs no data and
    its activations (if quantized) are dynamic; None when the model must be loaded."""
    if not q.streaming or q.needs_calibration or q.method in ("recipe", "prequantized"):
        return None
    if q.method == "rtn":
        return {"targets": ["Linear"], "weights": integer_weights(q)}
    if q.method == "fp8":
        return FP8_PRESETS[q.fp8_scheme]
    if q.method in FIXED_PRESETS:
        return FIXED_PRESETS[q.method]
    return None
