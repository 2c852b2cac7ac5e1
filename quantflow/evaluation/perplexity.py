"""Perplexity with rolling windows, batched.

Windowing (window L, stride S, S = L by default). Each document is prefixed with the
BOS token (EOS when there is none) and its tokens are scored exactly once:
- the first window scores tokens [0, L) from the prefix onwards;
- every later window scores the next S tokens, with the L - S tokens before them (at
  least one) as context; a final short window takes as much context as fits in L.
With S = L this is exactly lm-eval's `loglikelihood_rolling` windowing for the hf backend,
so token-level perplexity agrees with lm-eval's on the same text and model (tested).
A smaller S gives every token more context (lower, more "realistic" perplexity) at
L / S times the compute.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Window:
    doc: int
    start: int  # index into the prefixed sequence where the input begins
    end: int  # input is seq[start:end]
    first_scored: int  # first target position (in seq) that is scored


@dataclass
class PerplexityResult:
    perplexity: float
    nll_sum: float
    tokens: int
    bytes: int
    windows: int
    window: int
    stride: int

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / (self.bytes * math.log(2)) if self.bytes else float("nan")

    def as_dict(self) -> dict:
        return {**asdict(self), "bits_per_byte": self.bits_per_byte}


def plan_windows(doc_lengths: list[int], window: int, stride: int) -> list[Window]:
    """Windows over prefixed sequences seq = [prefix] + tokens, for each document.

    Target token j (0-based in the document) sits at seq position j + 1 and is predicted
    from seq[:j + 1]; a window with input seq[s:e] can score targets s+1 .. e.
    """
    plans = []
    for d, n in enumerate(doc_lengths):
        if n == 0:
            continue
        scored_to = min(window, n)  # first window: targets [0, L)
        plans.append(Window(d, 0, scored_to, 1))
        while scored_to < n:
            b = min(scored_to + stride, n)
            s = max(0, b - window)
            plans.append(Window(d, s, b, scored_to + 1))
            scored_to = b
    return plans


def _prefix_id(tokenizer) -> int:
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    raise ValueError("tokenizer has neither a BOS nor an EOS token to start documents with")


@torch.inference_mode()
def perplexity(model, tokenizer, documents: list[str], window: int, stride: int | None = None,
               batch_size: int = 4, max_tokens: int | None = None, progress=None) -> PerplexityResult:
    max_pos = getattr(model.config, "max_position_embeddings", None)
    window = min(window, max_pos) if max_pos else window
    stride = window if stride is None else min(stride, window)
    prefix = _prefix_id(tokenizer)
    seqs: list[list[int]] = []
    n_bytes = 0
    budget = max_tokens
    for doc in documents:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if budget is not None:
            ids = ids[:budget]
            budget -= len(ids)
        if ids:
            seqs.append([prefix] + ids)
            n_bytes += len(tokenizer.decode(ids).encode()) if budget is not None else len(doc.encode())
        if budget is not None and budget <= 0:
            break
    plans = plan_windows([len(s) - 1 for s in seqs], window, stride)
    # Equal-length windows batch without padding; most windows are exactly L long.
    plans.sort(key=lambda w: (w.end - w.start, w.doc, w.start))
    device = next(model.parameters()).device
    nll = 0.0
    scored = 0
    for i in range(0, len(plans), batch_size):
        group = plans[i:i + batch_size]
        by_len: dict[int, list[Window]] = {}
        for w in group:
            by_len.setdefault(w.end - w.start, []).append(w)
        for length, ws in by_len.items():
            inputs = torch.tensor([seqs[w.doc][w.start:w.end] for w in ws], device=device)
            logits = model(input_ids=inputs).logits.float()
            logprobs = torch.log_softmax(logits, dim=-1)
            for row, w in enumerate(ws):
                # Input position p predicts seq[start + p + 1]; score targets first_scored..end.
                first = w.first_scored - w.start - 1
                targets = torch.tensor(seqs[w.doc][w.first_scored:w.end + 1][:length - first],
                                       device=device)
                lp = logprobs[row, first:first + len(targets)].gather(1, targets[:, None])
                nll -= lp.double().sum().item()
                scored += len(targets)
        if progress:
            progress(min(i + batch_size, len(plans)), len(plans))
    if scored == 0:
        raise ValueError("no tokens to score: the held-out text is empty")
    return PerplexityResult(perplexity=math.exp(nll / scored), nll_sum=nll, tokens=scored,
                            bytes=n_bytes, windows=len(plans), window=window, stride=stride)
