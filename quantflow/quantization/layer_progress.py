"""Decoder layer k of n, seen from llm-compressor's sequential pipeline.

The sequential pipeline calibrates one decoder layer at a time over every calibration
sample before it moves on, so the first call into layer k means layers 0..k-1 are done.
Forward pre-hooks on the decoder layers read that off oneshot's own pass; no callback of
llm-compressor is needed. Data-free recipes run no forward pass: the phase then jumps from
0 to done when oneshot returns. The "basic" pipeline (whole model on the accelerator) runs
every layer for each sample, so it reports per layer within the first sample only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from quantflow.progress import report

PHASE = "decoder layers"


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The ModuleList of decoder layers: as long as the text config's num_hidden_layers
    (model.layers for Llama, Qwen, Mixtral; transformer.h for GPT-2 style models)."""
    want = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == want:
            return list(module)
    return []


@contextlib.contextmanager
def layer_progress(model: torch.nn.Module) -> Iterator[None]:
    layers = decoder_layers(model)
    total = len(layers)
    seen: set[int] = set()
    handles = []

    def hook_for(index: int):
        def pre_hook(module, args):
            if index not in seen:
                seen.add(index)
                report(PHASE, index, total, f"calibrating decoder layer {index + 1} of {total}")
        return pre_hook

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(hook_for(i)))
    try:
        yield
        report(PHASE, total, total, f"{total} decoder layers calibrated")
    finally:
        for h in handles:
            h.remove()
