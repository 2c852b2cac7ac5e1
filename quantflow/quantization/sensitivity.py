"""How much quantizing each decoder layer costs, one layer at a time.

For each decoder layer, every Linear in it is round-to-nearest quantized with the
candidate's integer scheme (compressed-tensors' own qparams and fake-quantize, the same
arithmetic llm-compressor's RTN writes), the rest of the model stays in full precision,
and the mean KL divergence of the next-token distributions from the baseline's is measured
on calibration samples. One forward pass per layer: a proxy for "quantize this block and
re-validate", cheap enough to rank 80 layers. Its use is checked end to end: the list it
builds must lower the perplexity increase of the same scheme (tests/test_search.py).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

import torch

from quantflow.config import QuantConfig

log = logging.getLogger("quantflow.sensitivity")
METHOD = "mean KL(baseline || one layer RTN-quantized) per token, calibration samples"


def _fake_quantize(weight: torch.Tensor, quant: QuantConfig) -> torch.Tensor:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    from quantflow.quantization.recipes import integer_weights

    args = QuantizationArgs(**integer_weights(quant))
    w = weight.detach().float()
    out_f, in_f = w.shape
    group = in_f if quant.group_size == -1 or in_f % quant.group_size else quant.group_size
    grouped = w.reshape(out_f, in_f // group, group)
    scale, zero_point = calculate_qparams(grouped.amin(dim=-1), grouped.amax(dim=-1), args)
    if quant.group_size == -1 or group != quant.group_size:
        args = QuantizationArgs(**{**integer_weights(quant), "strategy": "channel", "group_size": None})
    return fake_quantize(w, scale, zero_point, args).to(weight.dtype)


def _kl(base_logp: torch.Tensor, logp: torch.Tensor) -> float:
    return float((base_logp.exp() * (base_logp - logp)).sum(-1).mean())


def decoder_layers(model) -> list[torch.nn.Module]:
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        node = model
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, torch.nn.ModuleList):
            return list(node)
    raise ValueError(f"{type(model).__name__}: no list of decoder layers found "
                     "(model.layers, model.decoder.layers, transformer.h, gpt_neox.layers)")


def layer_pattern(index: int) -> str:
    """The llm-compressor ignore entry that keeps decoder layer `index` in full precision."""
    return rf"re:.*layers\.{index}\..*"


def measure_sensitivity(model, ids: torch.Tensor, quant: QuantConfig, batch_size: int = 4,
                        progress: Callable[[str], None] = log.info) -> dict:
    """{"layers": [{"layer", "kl", "linears"}], "ranking": [most sensitive first], …}.

    Samples go through in batches, each batch's baseline log-probs held only while its
    layers are measured: memory is bounded by one batch's logits, not the sample count
    (16 x 2048 tokens x 128k vocabulary would be 16 GiB at once)."""
    ignored = [re.compile(p[3:]) if p.startswith("re:") else None for p in quant.ignore]
    device = next(model.parameters()).device
    layers = decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    targets = []
    for layer in layers:
        prefix = names[id(layer)]
        linears = [(n, m) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
        targets.append([(n, m) for n, m in linears if not any(
            (rx.fullmatch(f"{prefix}.{n}") if rx else p == f"{prefix}.{n}")
            for rx, p in zip(ignored, quant.ignore))])
    totals = [0.0] * len(layers)
    tokens = 0
    start = time.perf_counter()
    with torch.no_grad():
        for b in range(0, ids.shape[0], batch_size):
            chunk = ids[b:b + batch_size].to(device)
            base = torch.log_softmax(model(chunk).logits.float(), dim=-1)
            for i, linears in enumerate(targets):
                saved = [m.weight.data for _, m in linears]
                for _, m in linears:
                    m.weight.data = _fake_quantize(m.weight.data, quant)
                try:
                    logp = torch.log_softmax(model(chunk).logits.float(), dim=-1)
                finally:
                    for (_, m), w in zip(linears, saved):
                        m.weight.data = w
                totals[i] += _kl(base, logp) * chunk.numel()
            tokens += chunk.numel()
            progress(f"sensitivity: {min(b + batch_size, ids.shape[0])}/{ids.shape[0]} samples, "
                     f"{len(layers)} layers each ({time.perf_counter() - start:.0f}s)")
    results = [{"layer": i, "kl": totals[i] / tokens, "linears": [n for n, _ in linears]}
               for i, linears in enumerate(targets)]
    ranking = [r["layer"] for r in sorted(results, key=lambda r: -r["kl"])]
    return {"method": METHOD, "scheme": quant.label, "samples": int(ids.shape[0]),
            "tokens": tokens, "layers": results, "ranking": ranking,
            "wall_s": round(time.perf_counter() - start, 3)}


def render_sensitivity_chart(docs: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from quantflow.reports.reporting import png_bytes

    fig, axes = plt.subplots(1, len(docs), figsize=(max(4.0, 0.35 * len(docs[0]["layers"]) + 2) * len(docs),
                                                    3.2), squeeze=False)
    for ax, doc in zip(axes[0], docs):
        top = set(doc["ranking"][: max(1, len(doc["ranking"]) // 4)])
        layers = doc["layers"]
        ax.bar([str(r["layer"]) for r in layers], [r["kl"] for r in layers],
               color=["#c62828" if r["layer"] in top else "#90a4ae" for r in layers])
        ax.set_title(f"{doc['scheme']}: one layer quantized at a time", fontsize=9)
        ax.set_xlabel("decoder layer", fontsize=8)
        ax.set_ylabel("mean KL vs baseline (nats)", fontsize=8)
        ax.tick_params(labelsize=8)
    return png_bytes(fig)
