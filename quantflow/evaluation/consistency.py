"""Output consistency: greedy generations and next-token KL divergence vs the baseline.

Perplexity can stay flat while specific abilities collapse; comparing what the model
actually says, and how its whole next-token distribution moved, catches that.
"""

from __future__ import annotations

import torch


@torch.inference_mode()
def greedy_generations(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """New token ids of each prompt's greedy continuation (one prompt at a time: no padding
    effects, so the result depends on the weights only)."""
    device = next(model.parameters()).device
    outs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
                             if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        outs.append(gen[0, ids.shape[1]:].tolist())
    return outs


def greedy_from_ids(model, tokenizer, ids: list[int], max_new_tokens: int) -> list[int]:
    """New token ids of the greedy continuation of already tokenized input (a rendered chat)."""
    device = next(model.parameters()).device
    x = torch.tensor([list(ids)], device=device)
    gen = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                         else tokenizer.eos_token_id)
    return gen[0, x.shape[1]:].tolist()


def compare_generations(baseline: list[list[int]], candidate: list[list[int]]) -> dict:
    """Exact-match rate and, per prompt, the first token index where the outputs differ."""
    divergence: list[int | None] = []
    for a, b in zip(baseline, candidate, strict=True):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first is None and len(a) != len(b):
            first = min(len(a), len(b))
        divergence.append(first)
    matches = sum(d is None for d in divergence)
    return {"exact_match_rate": matches / len(baseline) if baseline else 1.0,
            "first_divergence": divergence}


@torch.inference_mode()
def next_token_logprobs(model, tokenizer, text: str, n_tokens: int, window: int) -> torch.Tensor:
    """[n_tokens, vocab] log-probabilities over the first n_tokens of `text`, float16.

    float16 keeps the stored baseline small (tokens x vocab); the candidate is rounded the
    same way before comparing, so a model compared with itself gives exactly zero.
    """
    max_pos = getattr(model.config, "max_position_embeddings", None)
    window = min(window, max_pos) if max_pos else window
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(ids), window):
        inp = torch.tensor([ids[start:start + window]], device=device)
        chunks.append(torch.log_softmax(model(input_ids=inp).logits.float(), dim=-1)[0].half().cpu())
    return torch.cat(chunks)


def mean_kl(baseline_lp: torch.Tensor, candidate_lp: torch.Tensor) -> float:
    """Mean over tokens of KL(baseline || candidate), in nats."""
    if baseline_lp.shape != candidate_lp.shape:
        raise ValueError(f"log-prob shapes differ: baseline {tuple(baseline_lp.shape)} vs "
                         f"candidate {tuple(candidate_lp.shape)} (different tokenizer or text?)")
    p = baseline_lp.float()
    q = candidate_lp.float()
    kl = (p.exp() * (p - q)).sum(-1)
    return float(kl.mean().clamp_min(0.0))
