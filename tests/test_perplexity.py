"""The perplexity evaluator: windowing, and agreement with lm-eval's rolling log-likelihood."""

from __future__ import annotations

import json
import math

import pytest

from quantflow.config import LmEvalCheck
from quantflow.evaluation.lmeval import run_lm_eval
from quantflow.evaluation.loading import load_for_eval
from quantflow.evaluation.perplexity import perplexity, plan_windows

# Float32 sums in a different order (batched windows vs lm-eval's per-request scoring):
# agreement to 1e-4 relative is what the arithmetic allows; anything larger is a bug.
LMEVAL_REL_TOL = 1e-4


def _scored_targets(lengths, window, stride):
    scored = {}
    for w in plan_windows(lengths, window, stride):
        assert w.end - w.start <= window  # never longer than the context window
        assert w.first_scored > w.start  # at least one token of context
        for pos in range(w.first_scored, w.end + 1):
            scored[(w.doc, pos)] = scored.get((w.doc, pos), 0) + 1
    return scored


@pytest.mark.parametrize("window, stride", [(8, None), (8, 8), (8, 3), (8, 1), (16, 5)])
def test_every_token_is_scored_exactly_once(window, stride):
    lengths = [1, 7, 8, 9, 23, 64]
    scored = _scored_targets(lengths, window, stride or window)
    expected = {(d, p) for d, n in enumerate(lengths) for p in range(1, n + 1)}
    assert set(scored) == expected and set(scored.values()) == {1}


def test_disjoint_windows_match_lmeval_layout():
    # lm-eval: first window predicts t[0:L] from the prefix, later windows 1 token of context,
    # the final short window as much context as fits.
    plans = plan_windows([20], window=8, stride=8)
    assert [(w.start, w.end, w.first_scored) for w in plans] == [(0, 8, 1), (8, 16, 9), (12, 20, 17)]


@pytest.fixture(scope="module")
def model_and_docs(demo_dir):
    model, tok = load_for_eval(demo_dir / "model", "float32", "cpu")
    docs = [json.loads(line)["text"] for line in (demo_dir / "data" / "heldout.jsonl").read_text().splitlines()]
    return model, tok, docs


def test_smaller_stride_gives_more_context_and_lower_perplexity(model_and_docs):
    model, tok, docs = model_and_docs
    full = perplexity(model, tok, docs, window=128)
    strided = perplexity(model, tok, docs, window=128, stride=64)
    assert full.tokens == strided.tokens
    assert strided.perplexity < full.perplexity


def test_batching_does_not_change_the_result(model_and_docs):
    model, tok, docs = model_and_docs
    a = perplexity(model, tok, docs, window=128, batch_size=1)
    b = perplexity(model, tok, docs, window=128, batch_size=16)
    assert a.tokens == b.tokens and math.isclose(a.perplexity, b.perplexity, rel_tol=1e-5)


def test_agrees_with_lmeval_loglikelihood_rolling(model_and_docs, demo_dir):
    model, tok, docs = model_and_docs
    ours = perplexity(model, tok, docs, window=128, batch_size=8)
    check = LmEvalCheck(enabled=True, include_path=str(demo_dir / "tasks"), max_length=128,
                        batch_size=8, tasks=[{"name": "demo_ppl", "metric": "byte_perplexity"}])
    res = run_lm_eval(check, model=model, tokenizer=tok, model_dir=str(demo_dir / "model"),
                      max_length=128)["demo_ppl"]
    n_bytes = sum(len(d.encode()) for d in docs)
    n_tokens = sum(len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs)
    assert n_tokens == ours.tokens
    lmeval_token_ppl = res["byte_perplexity,none"] ** (n_bytes / n_tokens)
    assert math.isclose(ours.perplexity, lmeval_token_ppl, rel_tol=LMEVAL_REL_TOL), \
        (ours.perplexity, lmeval_token_ppl)
    assert math.isclose(ours.bits_per_byte, res["bits_per_byte,none"], rel_tol=LMEVAL_REL_TOL)
