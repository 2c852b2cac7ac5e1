"""Let llm-compressor's AWQ run on machines without an accelerator.

AWQ caches layer inputs in `IntermediatesCache` and pins them (`tensor.pin_memory()`) to
speed up host->GPU copies. On a CPU-only torch build pinning itself raises "Cannot access
accelerator device when none is available", so AWQ cannot run at all. Pinning has no
purpose without an accelerator, so when none exists we skip exactly that call and
nothing else. With an accelerator present this module changes nothing.
Checked against llmcompressor 0.14 (llmcompressor/pipelines/cache.py); if the method
moves, `apply()` raises instead of silently doing nothing.
"""

from __future__ import annotations

import torch


def needs_shim() -> bool:
    return not torch.accelerator.is_available()


def apply() -> bool:
    """Install the shim if there is no accelerator. Returns whether it is active."""
    if not needs_shim():
        return False
    from llmcompressor.pipelines.cache import IntermediatesCache

    if getattr(IntermediatesCache, "_quantflow_cpu_pinning", False):
        return True
    original = IntermediatesCache.__dict__.get("_pin_intermediate")
    if not isinstance(original, classmethod):
        raise RuntimeError("llmcompressor's IntermediatesCache._pin_intermediate changed shape; "
                           "the CPU AWQ shim in quantflow/quantization/cpu_pinning.py needs updating")
    pin = original.__func__

    def _pin_intermediate(cls, intermediate):
        if not torch.accelerator.is_available():
            return None
        return pin(cls, intermediate)

    IntermediatesCache._pin_intermediate = classmethod(_pin_intermediate)
    IntermediatesCache._quantflow_cpu_pinning = True
    return True
