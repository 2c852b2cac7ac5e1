"""Served fidelity: is the server about to take traffic running the model validate judged?

The new server scores the validated token windows (prompt log-probabilities, vLLM's
`prompt_logprobs`) and its perplexity is compared with validate's on the same windows. A
loader fault in the serving engine (split expert weights loaded into nothing, as in
sglang#37679; or transformers', in validate) moves that number far beyond the few percent
engines and kernels differ by. Checked before the rollout switches traffic.
"""

from __future__ import annotations

import math
from typing import Any

import httpx

from quantflow.evaluation.fidelity import slice_result


class FidelityFailed(Exception):
    pass


def served_slice(base_url: str, model: str, windows: list[list[int]], api_key: str | None,
                 timeout_s: float = 120) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    nll, tokens = 0.0, 0
    with httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s) as http:
        for w in windows:
            r = http.post("/v1/completions", json={"model": model, "prompt": w, "max_tokens": 1,
                                                    "temperature": 0, "prompt_logprobs": 0})
            if r.status_code != 200:
                raise FidelityFailed(f"/v1/completions with prompt_logprobs answered {r.status_code}: "
                                     f"{r.text[:300]}")
            scored = r.json()["choices"][0].get("prompt_logprobs") or []
            for pos, token in enumerate(w[1:], start=1):
                entry = (scored[pos] or {}).get(str(token)) if pos < len(scored) else None
                if entry is None:
                    raise FidelityFailed(f"the server returned no log-probability for prompt token {pos} "
                                         f"(id {token}) of a {len(w)}-token window")
                nll -= float(entry["logprob"] if isinstance(entry, dict) else entry)
                tokens += 1
    return slice_result(nll, tokens)


def compare_fidelity(validated: dict[str, Any], served: dict[str, Any], max_delta_pct: float) -> dict[str, Any]:
    delta = 100.0 * (served["perplexity"] - validated["perplexity"]) / validated["perplexity"]
    ok = math.isfinite(delta) and abs(delta) <= max_delta_pct
    return {"validated_perplexity": round(validated["perplexity"], 4),
            "served_perplexity": round(served["perplexity"], 4), "delta_pct": round(delta, 3),
            "max_delta_pct": max_delta_pct, "tokens": served["tokens"], "passed": ok}
