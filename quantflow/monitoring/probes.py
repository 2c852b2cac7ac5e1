"""Quality probes and a bounded load check against a live endpoint."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from quantflow.config import CompletionCheck
from quantflow.storage.manifests import now
from quantflow.monitoring.state import MonitorState
from quantflow.serving.health import CompletionsClient, answer_matches, golden_answers


def run_probes(client: CompletionsClient, probes: list[CompletionCheck],
               state: MonitorState, golden: list[dict] | None = None) -> list[dict[str, Any]]:
    """One request per probe; score 1 when the answer contains the expected text, or starts
    like a recorded golden answer (the baseline's or the validated model's) when the probe
    names none."""
    results = []
    for probe in probes:
        references = golden_answers(golden, probe)
        entry: dict[str, Any] = {"time": now(), "prompt": probe.key, "expected": probe.expected,
                                 "golden": references[0] if references else None}
        try:
            done = client.ask(probe)
        except httpx.HTTPError as err:
            entry.update(score=0.0, error=f"{type(err).__name__}: {err}"[:300])
        else:
            entry.update(score=1.0 if answer_matches(done.text, probe.expected, references) else 0.0,
                         answer=done.text, latency_s=round(done.latency_s, 4),
                         completion_tokens=done.completion_tokens)
            state.observe_latency("probe", done.latency_s)
            if done.latency_s > 0 and done.completion_tokens:
                state.throughput_tps = done.completion_tokens / done.latency_s
        results.append(entry)
    return results


def load_check(client: CompletionsClient, checks: list[CompletionCheck], requests: int, concurrency: int,
               max_tokens: int, state: MonitorState, deadline_s: float = 120) -> dict[str, Any]:
    """`requests` completions, `concurrency` at a time, stopping at `deadline_s`. Records
    each latency under operation="completion" and the aggregate token throughput."""
    start = time.perf_counter()
    stop_at = start + deadline_s

    def one(i: int):
        if time.perf_counter() > stop_at:
            return None
        try:
            check = checks[i % len(checks)]
            return client.ask(check.model_copy(update={"max_tokens": max_tokens}))
        except httpx.HTTPError as err:
            return err

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        outcomes = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    done = [o for o in outcomes if o is not None and not isinstance(o, Exception)]
    errors = [str(o) for o in outcomes if isinstance(o, Exception)]
    for d in done:
        state.observe_latency("completion", d.latency_s)
    tokens = sum(d.completion_tokens for d in done)
    if wall > 0 and tokens:
        state.throughput_tps = tokens / wall
    lat = sorted(d.latency_s for d in done)
    return {"requests": requests, "completed": len(done), "errors": errors,
            "skipped": sum(o is None for o in outcomes), "wall_s": round(wall, 3),
            "tokens": tokens, "throughput_tps": round(tokens / wall, 2) if wall else None,
            "p50_s": lat[len(lat) // 2] if lat else None,
            "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None}
