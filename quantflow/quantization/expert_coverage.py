"""How many calibration tokens the router sent to each expert, counted while quantizing.

With top-k routing over many experts, rarely chosen experts can see few or no calibration
tokens. llm-compressor calibrates every expert on every token (`moe_calibrate_all_experts`,
its default, which quantflow keeps), so no expert's quantizer goes without statistics; the
routed counts show which experts those statistics represent poorly. They are counted by
forward hooks on the routers during `oneshot`'s own calibration pass: no extra forward pass
over a model that may have hundreds of billions of parameters.

llm-compressor's sequential pipeline runs every layer twice per sample (calibrate, then
propagate the quantized outputs); each router counts only its first `samples` calls.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
from typing import Any

import torch

log = logging.getLogger("quantflow.quantize")


def _routers(model) -> list[tuple[str, Any]]:
    """Router modules: an MoE block's `gate` (`mlp.gate`, `block_sparse_moe.gate`) or a
    module whose class is a router, never a shared-expert gate (one output)."""
    found = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        cls = type(module).__name__
        if leaf == "shared_expert_gate":
            continue
        if (leaf == "gate" and (".mlp." in f".{name}." or "block_sparse_moe" in name)
                and not name.endswith(("gate_proj", "gate_up_proj"))) or cls.endswith("TopKRouter"):
            found.append((name, module))
    return found


def _selected(output, top_k: int) -> torch.Tensor | None:
    """The expert indices a router chose: transformers 5 routers return
    (logits, scores, indices); older ones return logits, from which top-k is taken."""
    if isinstance(output, tuple):
        ints = [t for t in output if isinstance(t, torch.Tensor) and not t.is_floating_point()]
        if ints:
            return ints[-1]
        output = output[0]
    if isinstance(output, torch.Tensor) and output.is_floating_point() and top_k > 0:
        return output.reshape(-1, output.shape[-1]).topk(top_k, dim=-1).indices
    return None


@contextlib.contextmanager
def count_expert_tokens(model, num_experts: int, top_k: int, samples: int):
    """Yields a dict filled, on exit, with {router name: tokens routed to each expert}."""
    counts: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}
    handles = []

    def hook(name: str):
        def count(_module, _inputs, output):
            if calls.get(name, 0) >= samples:
                return
            calls[name] = calls.get(name, 0) + 1
            idx = _selected(output, top_k)
            if idx is not None:
                c = torch.bincount(idx.reshape(-1).long().cpu(), minlength=num_experts)
                counts[name] = counts.get(name, torch.zeros_like(c)) + c
        return count

    for name, module in _routers(model):
        handles.append(module.register_forward_hook(hook(name)))
    result: dict[str, list[int]] = {}
    try:
        yield result
    finally:
        for h in handles:
            h.remove()
        result.update({name: c.tolist() for name, c in counts.items()})


def summarize(per_layer: dict[str, list[int]], threshold: int) -> dict[str, Any] | None:
    """min / median / max routed tokens over every (layer, expert) and the experts under
    `threshold`, named "layer.expert"; None when nothing was counted (dense or data-free)."""
    if not per_layer:
        return None
    flat = [(layer, e, n) for layer, row in sorted(per_layer.items()) for e, n in enumerate(row)]
    values = [n for _, _, n in flat]
    starved = [f"{layer} expert {e}: {n}" for layer, e, n in flat if n < threshold]
    return {"calibrate_all_experts": True, "layers": len(per_layer), "experts_per_layer": len(flat) // len(per_layer),
            "routed_tokens": {"min": min(values), "median": statistics.median(values), "max": max(values)},
            "threshold": threshold, "under_threshold": starved, "per_layer": per_layer}


def warn_if_starved(summary: dict[str, Any] | None) -> str | None:
    if not summary or not summary["under_threshold"]:
        return None
    names = summary["under_threshold"]
    more = f" and {len(names) - 8} more" if len(names) > 8 else ""
    msg = (f"{len(names)} expert(s) were routed fewer than {summary['threshold']} calibration tokens "
           f"({'; '.join(names[:8])}{more}). llm-compressor calibrated every expert on every token, "
           "but these experts' real inputs are barely represented: use more or more varied "
           "calibration data (calibration.num_samples), and check their quality in the report")
    log.warning("quantize: %s", msg)
    return msg
