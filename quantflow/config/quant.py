"""Stage 3 settings, in the vocabulary AutoGPTQ and AutoAWQ users already know.

AutoGPTQ (bits, group_size, desc_act, damp_percent, sym, true_sequential) and AutoAWQ
(w_bit, q_group_size, zero_point, version) keys are accepted and translated; the engine
behind every method is llm-compressor (both AutoGPTQ and AutoAWQ are archived and do not
run on current torch/transformers).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from quantflow.config.base import StrictModel

Method = Literal["gptq", "awq", "rtn", "fp8", "w8a8", "w8a16", "nvfp4", "mxfp4",
                 "recipe", "prequantized"]

# Integer weight-only methods and the bit widths llm-compressor + vLLM kernels support.
ALLOWED_BITS: dict[str, tuple[int, ...]] = {"gptq": (2, 3, 4, 8), "rtn": (2, 3, 4, 8), "awq": (3, 4)}
ALLOWED_GROUP_SIZES: tuple[int, ...] = (-1, 32, 64, 128)  # -1 = one scale per output channel
# Methods whose scheme is fixed: bits / group_size / sym do not apply to them.
FIXED_SCHEME_METHODS = ("fp8", "w8a8", "w8a16", "nvfp4", "mxfp4", "recipe", "prequantized")

# AutoGPTQ / AutoAWQ spelling -> quantflow field.
LEGACY_ALIASES = {"w_bit": "bits", "q_group_size": "group_size",
                  "damp_percent": "dampening_frac", "version": "awq_version"}
# AutoGPTQ's damp_percent is a fraction of the Hessian diagonal mean despite its name
# (default 0.01), the same unit as llm-compressor's dampening_frac: no conversion.


class QuantConfig(StrictModel):
    # AutoGPTQ/AutoAWQ spellings accepted besides the fields ("did you mean" suggests them too).
    legacy_keys: ClassVar[tuple[str, ...]] = (*LEGACY_ALIASES, "zero_point", "desc_act")

    method: Method = "gptq"
    """Quantization algorithm: gptq, awq, rtn (round to nearest, data-free), fp8, w8a8 (SmoothQuant
    + GPTQ, INT8 weights and activations), w8a16, nvfp4, mxfp4, recipe (your own llm-compressor
    recipe) or prequantized (validate someone else's checkpoint)."""
    bits: Literal[2, 3, 4, 8] = 4
    """Weight bits for gptq, rtn (2, 3, 4, 8) and awq (3, 4); AutoAWQ's w_bit. Other methods fix
    their own."""
    group_size: Literal[-1, 32, 64, 128] = Field(
        default=128, title="Group size (weights per scale; -1 = per channel)", examples=[128, 64, -1])
    """Weights sharing one scale along the input dimension (32, 64, 128), or -1 for one scale per
    output channel; AutoAWQ's q_group_size. Must divide every quantized layer's input width."""
    sym: bool | None = None
    """Symmetric integer weights. None = the method's usual choice: asymmetric (zero point) for
    awq, as AutoAWQ's zero_point=True default; symmetric otherwise."""
    actorder: Literal["static", "weight", "group"] | None = "static"
    '''GPTQ column order. "static": by decreasing activation, groups kept contiguous (no runtime
    cost; llm-compressor's default); "group": AutoGPTQ's desc_act=True (per-column group index
    at runtime); None: natural order (desc_act=False).'''
    dampening_frac: float = Field(default=0.01, gt=0, lt=1,
                                  title="GPTQ dampening (fraction of the Hessian diagonal)", examples=[0.01, 0.1])
    """GPTQ dampening, a fraction of the Hessian diagonal's mean (AutoGPTQ's damp_percent, same
    unit)."""
    true_sequential: bool = True
    """Accepted for AutoGPTQ configs; llm-compressor always calibrates layer by layer."""
    awq_version: Literal["GEMM", "GEMV"] = "GEMM"
    """AutoAWQ kernel choice (its version key); recorded as metadata only."""
    fp8_scheme: Literal["dynamic", "static", "block"] = "dynamic"
    """Method fp8: dynamic (per-channel weights, per-token activation scales computed at run time,
    data-free), static (activation scales from calibration data) or block (128 x 128 weight
    blocks)."""
    smoothing_strength: float = Field(default=0.8, gt=0, lt=1,
                                      title="SmoothQuant alpha (0-1)", examples=[0.5, 0.8])
    """Method w8a8: SmoothQuant's alpha, how much activation outlier range moves into the weights
    (0-1)."""
    ignore: list[str] = Field(default=["lm_head"],
                              title="Modules kept in full precision", examples=[["lm_head", "re:.*mlp\\.gate$"]])
    '''Modules kept in full precision: names or "re:" regexes, e.g. "re:.*layers\\.0\\..*". MoE
    router gates are added per architecture.'''
    recipe: str | None = None
    '''Method "recipe": an llm-compressor recipe, as YAML text or the path of a YAML file.'''
    checkpoint: str | None = None
    '''Method "prequantized": hub id or folder of a checkpoint someone else quantized (compressed-
    tensors, GPTQ or AWQ format); model.id is then its full-precision baseline.'''
    device: Literal["auto", "cpu", "cuda"] = "auto"
    '''"cuda": require a GPU (refused before loading anything when there is none). Streamed schemes
    run on this device; calibrated methods onload layers to the GPU when one exists.'''
    streaming: bool = True
    """Data-free schemes stream safetensors shards (llm-compressor model_free_ptq), so a 70B FP8
    conversion needs disk, not GPU memory. Off = load the model and quantize in place."""
    sequential_onloading: bool = True
    """Calibrate one decoder layer at a time on the accelerator (llm-compressor's sequential
    pipeline), so GPU memory bounds a layer, not the model. False = whole model at once."""

    @model_validator(mode="before")
    @classmethod
    def _translate_legacy_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "zero_point" in data:
            zp = data.pop("zero_point")
            if not isinstance(zp, bool):
                raise ValueError("quant.zero_point must be true or false (AutoAWQ spelling of sym=false)")
            if "sym" in data and data["sym"] == zp:
                raise ValueError("quant.zero_point and quant.sym disagree: set only one "
                                 "(zero_point: true means sym: false)")
            data["sym"] = not zp
        if "desc_act" in data:
            desc_act = data.pop("desc_act")
            if not isinstance(desc_act, bool):
                raise ValueError("quant.desc_act must be true or false (AutoGPTQ act-order)")
            if "actorder" in data:
                raise ValueError("quant.desc_act and quant.actorder are the same setting: keep one")
            data["actorder"] = "group" if desc_act else None
        for old, new in LEGACY_ALIASES.items():
            if old in data:
                if new in data and data[new] != data[old]:
                    raise ValueError(f"quant.{old} and quant.{new} are the same setting with "
                                     f"different values ({data[old]!r} vs {data[new]!r}): keep one")
                data[new] = data.pop(old)
        return data

    @model_validator(mode="after")
    def _check_scheme(self) -> "QuantConfig":
        m = self.method
        if m in ALLOWED_BITS:
            allowed = ALLOWED_BITS[m]
            if self.bits not in allowed:
                raise ValueError(f"quant.bits={self.bits} is not supported for method {m!r}; "
                                 f"allowed: {', '.join(map(str, allowed))}")
        else:
            given = self._changed("bits", "group_size", "sym", "actorder")
            if given:
                raise ValueError(f"quant.{given[0]} does not apply to method {m!r} (its scheme is "
                                 f"fixed); remove it, or use gptq, awq or rtn for integer weights")
        if m == "recipe" and not self.recipe:
            raise ValueError("quant.recipe is required for method 'recipe': the path of an "
                             "llm-compressor recipe YAML")
        for name, owner in (("fp8_scheme", "fp8"), ("smoothing_strength", "w8a8"),
                            ("awq_version", "awq")):
            if m != owner and self._changed(name):
                raise ValueError(f"quant.{name} applies to method {owner!r} only, not {m!r}")
        if m != "recipe" and self.recipe:
            raise ValueError(f"quant.recipe is only used with method 'recipe' (method is {m!r})")
        if m == "prequantized" and not self.checkpoint:
            raise ValueError("quant.checkpoint is required for method 'prequantized': the hub id "
                             "or folder of the already-quantized model")
        if m != "prequantized" and self.checkpoint:
            raise ValueError(f"quant.checkpoint is only used with method 'prequantized' (method is {m!r})")
        if m not in ("gptq", *FIXED_SCHEME_METHODS) and self._changed("actorder"):
            raise ValueError(f"quant.actorder (desc_act) applies to gptq only, not {m!r}")
        return self

    def _changed(self, *names: str) -> list[str]:
        """Fields set to something other than their default. Forms (the Prefect UI) send
        every field, so "was it given" cannot tell intent; "does it differ" can."""
        return [n for n in names if getattr(self, n) != type(self).model_fields[n].default]

    @property
    def symmetric(self) -> bool:
        return self.sym if self.sym is not None else self.method != "awq"

    @property
    def needs_calibration(self) -> bool:
        if self.method in ("gptq", "awq", "w8a8", "recipe"):
            return True
        return self.method == "fp8" and self.fp8_scheme == "static"

    @property
    def label(self) -> str:
        """Short scheme name used in file names, metrics labels and reports."""
        if self.method in ALLOWED_BITS:
            g = "ch" if self.group_size == -1 else f"g{self.group_size}"
            return f"{self.method}-w{self.bits}a16-{g}{'' if self.symmetric else '-asym'}"
        if self.method == "fp8":
            return f"fp8-{self.fp8_scheme}"
        return self.method
