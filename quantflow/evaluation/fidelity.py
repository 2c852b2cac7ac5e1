"""The served-fidelity slice: token windows of the held-out text and their perplexity.

Validate scores them with the model it judged; deploy sends the same token ids to the new
vLLM server and reads its prompt log-probabilities (serving/fidelity.py). Each window is
[BOS] + `window` tokens, scored independently, so both engines see identical inputs.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from quantflow.evaluation.perplexity import _prefix_id


def fidelity_windows(tokenizer, text: str, windows: int, window: int) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: windows * window]
    prefix = _prefix_id(tokenizer)
    return [[prefix] + ids[i:i + window] for i in range(0, len(ids), window) if len(ids[i:i + window]) > 1]


def slice_result(nll: float, tokens: int) -> dict[str, Any]:
    return {"perplexity": math.exp(nll / tokens), "nll_sum": nll, "tokens": tokens}


@torch.inference_mode()
def model_slice(model, windows: list[list[int]]) -> dict[str, Any]:
    """Perplexity of every token after the first of each window, given the ones before it."""
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    for w in windows:
        ids = torch.tensor([w], device=device)
        logprobs = torch.log_softmax(model(input_ids=ids).logits.float()[0, :-1], dim=-1)
        nll -= logprobs.gather(1, ids[0, 1:, None]).double().sum().item()
        tokens += len(w) - 1
    return slice_result(nll, tokens)
