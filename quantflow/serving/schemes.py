"""What a quantized checkpoint asks of the serving kernels, as one comparable signature.

Two checkpoints with the same signature need the same vLLM kernels, whatever method made
them (GPTQ and RTN W4A16 g128 are one scheme to vLLM), so serving compatibility is measured
and cached per signature, not per method or per model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from quantflow.config import QuantConfig
from quantflow.storage.hashing import digest_of

# The fields of a quantizer that decide which kernel runs; the rest (observer, actorder
# static/weight, …) changes the numbers, not the kernel.
KERNEL_FIELDS = ("num_bits", "type", "symmetric", "strategy", "group_size", "block_structure",
                 "dynamic", "scale_dtype", "zp_dtype")


def _args(args: dict | None) -> dict | None:
    if not args:
        return None
    try:  # canonical form: a saved config and a preset spell defaults differently
        from compressed_tensors.quantization import QuantizationArgs

        args = QuantizationArgs.model_validate(args).model_dump(mode="json")
    except Exception:  # noqa: BLE001 - an unknown field or newer format: compare as written
        pass
    return {k: args.get(k) for k in KERNEL_FIELDS if args.get(k) not in (None, False)
            or (k in ("symmetric", "dynamic") and args.get(k) is not None)}


@dataclass(frozen=True)
class Scheme:
    """Kernel-relevant content of a compressed-tensors quantization_config."""

    groups: tuple[str, ...]  # JSON of each config group's weights/activations args, sorted
    format: str | None

    @classmethod
    def from_groups(cls, groups: list[dict[str, Any]], fmt: str | None) -> "Scheme":
        norm = sorted(json.dumps({"weights": _args(g.get("weights")),
                                  "input_activations": _args(g.get("input_activations"))},
                                 sort_keys=True) for g in groups)
        return cls(groups=tuple(dict.fromkeys(norm)), format=fmt)

    @classmethod
    def from_quantization_config(cls, qcfg: dict[str, Any]) -> "Scheme | None":
        """None when the checkpoint is not compressed-tensors (AutoGPTQ/AutoAWQ format)."""
        if qcfg.get("quant_method") not in (None, "compressed-tensors"):
            return None
        groups = [g for g in (qcfg.get("config_groups") or {}).values() if isinstance(g, dict)]
        if not groups:
            return None
        return cls.from_groups(groups, qcfg.get("format"))

    @property
    def key(self) -> str:
        return digest_of({"groups": list(self.groups), "format": self.format})[:16]

    @property
    def label(self) -> str:
        """W4A16 (int, group 128, sym), FP8 W8A8 (dynamic), … one per config group."""
        return " + ".join(_group_label(json.loads(g)) for g in self.groups)

    def config_groups(self) -> dict[str, Any]:
        """llm-compressor config_groups that reproduce this scheme on Linear layers."""
        out = {}
        for i, g in enumerate(self.groups):
            d = json.loads(g)
            out[f"group_{i}"] = {"targets": ["Linear"], **{k: v for k, v in d.items() if v}}
        return out

    @property
    def static_activations(self) -> bool:
        return any((json.loads(g).get("input_activations") or {}).get("dynamic") is False
                   for g in self.groups)


def checkpoint_config(uri: str) -> dict | None:
    """A checkpoint folder's config.json (local or s3://); None when it has none."""
    from quantflow.storage.store import read_uri

    try:
        return json.loads(read_uri(f"{str(uri).rstrip('/')}/config.json"))
    except FileNotFoundError:
        return None


def scheme_of_checkpoint(uri: str) -> Scheme | None:
    """The scheme in a checkpoint folder's config.json (local or s3://); None when it has no
    compressed-tensors quantization_config."""
    config = checkpoint_config(uri)
    if config is None:
        return None
    qcfg = config.get("quantization_config")
    return Scheme.from_quantization_config(qcfg) if qcfg else None


def _group_label(g: dict) -> str:
    w, a = g.get("weights") or {}, g.get("input_activations") or {}
    name = f"W{w.get('num_bits', 16)}A{a.get('num_bits', 16)}"
    if w.get("type") == "float":
        name = f"FP{w.get('num_bits')} {name}"
    details = [] if w.get("type") == "float" else ["int"]
    strategy = w.get("strategy")
    if strategy in ("group", "tensor_group"):
        details.append(f"group {w.get('group_size')}")
    elif strategy == "block":
        details.append(f"block {w.get('block_structure')}")
    elif strategy:
        details.append(f"per {strategy}")
    if w.get("type") == "int":
        details.append("sym" if w.get("symmetric", True) else "asym")
    if a:
        details.append("dynamic activations" if a.get("dynamic") else "static activations")
    return f"{name} ({', '.join(details)})"


def preset_groups(name: str) -> list[dict[str, Any]]:
    """compressed-tensors' own definition of a preset scheme (W8A8, FP8_DYNAMIC, …)."""
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(name, ["Linear"])
    return [scheme.model_dump(mode="json", exclude_none=True)]


def scheme_for(q: QuantConfig) -> Scheme | None:
    """The scheme a quant config will produce, known before quantizing; None when it depends
    on a user recipe or on someone else's checkpoint (checked at deploy from its config)."""
    from quantflow.quantization.recipes import FIXED_PRESETS, FP8_PRESETS, integer_weights

    if q.method in ("gptq", "rtn", "awq"):
        groups = [{"weights": integer_weights(q)}]
        fmt = "pack-quantized"
    elif q.method == "w8a8":
        groups, fmt = preset_groups("W8A8"), "int-quantized"
    elif q.method == "fp8":
        groups, fmt = preset_groups(FP8_PRESETS[q.fp8_scheme]), "float-quantized"
    elif q.method in FIXED_PRESETS:
        fmt = {"w8a16": "pack-quantized", "nvfp4": "nvfp4-pack-quantized",
               "mxfp4": "mxfp4-pack-quantized"}[q.method]
        groups = preset_groups(FIXED_PRESETS[q.method])
    else:
        return None
    return Scheme.from_groups(groups, fmt)


# Every scheme quantflow's built-in methods produce, for `quantflow doctor` (name, config).
CATALOG: list[tuple[str, dict[str, Any]]] = [
    ("w4a16", {"method": "gptq", "bits": 4, "group_size": 128}),
    ("w4a16-asym", {"method": "awq", "bits": 4, "group_size": 128}),
    ("w4a16-g64", {"method": "gptq", "bits": 4, "group_size": 64}),
    ("w3a16", {"method": "gptq", "bits": 3, "group_size": 64}),
    ("w2a16", {"method": "rtn", "bits": 2, "group_size": 64}),
    ("w8a16", {"method": "w8a16"}),  # the same scheme as gptq/rtn bits 8, group 128
    ("w8a8-int8", {"method": "w8a8"}),
    ("fp8-dynamic", {"method": "fp8", "fp8_scheme": "dynamic"}),
    ("fp8-static", {"method": "fp8", "fp8_scheme": "static"}),
    ("fp8-block", {"method": "fp8", "fp8_scheme": "block"}),
    ("nvfp4", {"method": "nvfp4"}),
    ("mxfp4", {"method": "mxfp4"}),
]


def catalog() -> dict[str, QuantConfig]:
    return {name: QuantConfig.model_validate(cfg) for name, cfg in CATALOG}


def method_hint(name: str) -> str:
    """How to ask for a catalog scheme in a config (quant: …)."""
    cfg = dict(CATALOG)[name]
    return ", ".join(f"{k}: {v}" for k, v in cfg.items())
