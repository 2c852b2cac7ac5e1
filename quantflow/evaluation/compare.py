"""Turn baseline and candidate metrics into gate checks: one verdict, every number shown."""

from __future__ import annotations

from typing import Any

from quantflow.config import ValidationConfig
from quantflow.errors import StageError
from quantflow.evaluation.consistency import compare_generations
from quantflow.evaluation.lmeval import metric_key


def check_result(name: str, metric: str, baseline: float, quantized: float, threshold: float | None,
           passed: bool, rule: str, **extra: Any) -> dict[str, Any]:
    delta = quantized - baseline
    return {"check": name, "metric": metric, "baseline": baseline, "quantized": quantized,
            "delta": delta, "delta_pct": (100.0 * delta / baseline) if baseline else 0.0,
            "threshold": threshold, "rule": rule, "passed": passed,
            "gating": threshold is not None, **extra}


def compare(baseline: dict, candidate: dict, validation: ValidationConfig,
            kl: float | None = None) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    if validation.perplexity.enabled:
        b = baseline["perplexity"]["perplexity"]
        q = candidate["perplexity"]["perplexity"]
        limit = validation.perplexity.max_increase_pct
        inc = 100.0 * (q - b) / b
        checks.append(check_result("perplexity", "perplexity", b, q, limit, inc <= limit,
                             f"increase <= {limit}%", tokens=candidate["perplexity"]["tokens"]))
    if validation.lm_eval.enabled:
        for task in validation.lm_eval.tasks:
            key = metric_key(task)
            try:
                b = float(baseline["lm_eval"][task.name][key])
                q = float(candidate["lm_eval"][task.name][key])
            except KeyError:
                have = sorted(candidate.get("lm_eval", {}).get(task.name, {}))
                raise StageError("validate", f"lm-eval task {task.name!r} reported no {key!r} "
                                 f"(it reported: {', '.join(have) or 'nothing'})",
                                 "set validation.lm_eval.tasks[].metric and .filter to one of those") from None
            recovery = q / b if b else (1.0 if q >= b else 0.0)
            ok = True
            rules = []
            if task.min_recovery is not None:
                ok &= recovery >= task.min_recovery
                rules.append(f"recovery >= {task.min_recovery}")
            if task.max_drop is not None:
                ok &= (b - q) <= task.max_drop
                rules.append(f"drop <= {task.max_drop}")
            threshold = task.min_recovery if task.min_recovery is not None else task.max_drop
            checks.append(check_result(f"lm_eval:{task.name}", key, b, q, threshold, ok,
                                 " and ".join(rules) or "reported only", recovery=recovery))
    if validation.consistency.enabled:
        cons = validation.consistency
        gen = compare_generations(baseline["generations"]["token_ids"],
                                  candidate["generations"]["token_ids"])
        rate = gen["exact_match_rate"]
        ok = cons.min_exact_match is None or rate >= cons.min_exact_match
        checks.append(check_result("greedy_consistency", "exact_match_rate", 1.0, rate, cons.min_exact_match,
                             ok, f"rate >= {cons.min_exact_match}" if cons.min_exact_match is not None
                             else "reported only", first_divergence=gen["first_divergence"]))
        if kl is not None:
            ok = cons.max_kl is None or kl <= cons.max_kl
            checks.append(check_result("kl_divergence", "mean_kl_nats", 0.0, kl, cons.max_kl, ok,
                                 f"kl <= {cons.max_kl}" if cons.max_kl is not None else "reported only",
                                 tokens=candidate["logprobs"]["tokens"]))
    return checks
