"""Benchmark: quantflow's perplexity evaluator vs lm-eval's loglikelihood_rolling.

Same model, same text, same window (128) and batch size, same process; each timed
several times after a warm-up. Prints both perplexities, their relative difference and
the speed ratio (lm-eval time / quantflow time; > 1 means quantflow is faster).

    make benchmark        (or: .venv/bin/python benchmarks/perplexity_vs_lmeval.py)
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from quantflow.config import LmEvalCheck
from quantflow.demo.assets import DEFAULT_DIR, build_demo_assets
from quantflow.evaluation.lmeval import run_lm_eval
from quantflow.evaluation.loading import load_for_eval
from quantflow.evaluation.perplexity import perplexity

REPEATS = 5
WINDOW = 128
BATCH = 8


def timed(fn):
    fn()  # warm-up
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def compare() -> dict:
    root = build_demo_assets(Path(DEFAULT_DIR), log=lambda *_: None)
    model, tok = load_for_eval(root / "model", "float32", "cpu")
    docs = [json.loads(x)["text"] for x in (root / "data" / "heldout.jsonl").read_text().splitlines()]
    check = LmEvalCheck(enabled=True, include_path=str(root / "tasks"), max_length=WINDOW,
                        batch_size=BATCH, tasks=[{"name": "demo_ppl", "metric": "byte_perplexity"}])
    ours, t_ours = timed(lambda: perplexity(model, tok, docs, window=WINDOW, batch_size=BATCH))
    theirs, t_lmeval = timed(lambda: run_lm_eval(check, model=model, tokenizer=tok,
                                                 model_dir=str(root / "model"), max_length=WINDOW))
    n_bytes = sum(len(d.encode()) for d in docs)
    lm_ppl = theirs["demo_ppl"]["byte_perplexity,none"] ** (n_bytes / ours.tokens)
    return {"documents": len(docs), "tokens": ours.tokens, "window": WINDOW, "batch": BATCH, "repeats": REPEATS,
            "quantflow_ppl": ours.perplexity, "quantflow_s": t_ours, "lmeval_ppl": lm_ppl, "lmeval_s": t_lmeval,
            "relative_difference": abs(ours.perplexity - lm_ppl) / lm_ppl, "speed_ratio": t_lmeval / t_ours}


def main() -> None:
    r = compare()
    print(f"text: {r['documents']} documents, {r['tokens']} tokens, window {WINDOW}, batch {BATCH}, "
          f"median of {REPEATS} runs")
    print(f"quantflow perplexity  {r['quantflow_ppl']:.6f}   {r['quantflow_s']:.3f}s")
    print(f"lm-eval   perplexity  {r['lmeval_ppl']:.6f}   {r['lmeval_s']:.3f}s   (rolling log-likelihood, hf backend)")
    print(f"relative difference   {r['relative_difference']:.2e}")
    print(f"speed ratio           {r['speed_ratio']:.2f}x  (lm-eval time / quantflow time)")


if __name__ == "__main__":
    main()
