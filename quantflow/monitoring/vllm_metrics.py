"""Latency from vLLM's own Prometheus histograms, over the window between two scrapes."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

WATCHED = ("vllm:e2e_request_latency_seconds", "vllm:time_to_first_token_seconds")


def scrape(base_url: str, timeout_s: float = 10) -> dict[str, dict[str, float]]:
    """{histogram name: {le: cumulative count}} for the watched histograms (all models summed)."""
    answer = httpx.get(base_url.rstrip("/") + "/metrics", timeout=timeout_s)
    # Behind nginx a dead vLLM answers 502 with an HTML page, which is no exposition text.
    answer.raise_for_status()
    text = answer.text
    out: dict[str, dict[str, float]] = {name: {} for name in WATCHED}
    for family in text_string_to_metric_families(text):
        if family.name not in WATCHED:
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                le = sample.labels["le"]
                out[family.name][le] = out[family.name].get(le, 0.0) + sample.value
    return out


def quantile(before: dict[str, float], after: dict[str, float], q: float) -> float | None:
    """q-quantile of the requests observed between two cumulative bucket snapshots: the
    upper bound of the first bucket whose cumulative share reaches q (Prometheus'
    histogram_quantile without interpolation, so it never reports below a bucket edge)."""
    if after.get("+Inf", 0.0) < before.get("+Inf", 0.0):
        before = {}  # the counters fell: the server restarted since, and counts from zero
    edges = sorted(after, key=lambda le: float("inf") if le == "+Inf" else float(le))
    total = after.get("+Inf", 0.0) - before.get("+Inf", 0.0)
    if total <= 0:
        return None
    for le in edges:
        if (after[le] - before.get(le, 0.0)) >= q * total:
            return float("inf") if le == "+Inf" else float(le)
    return float("inf")


def release_snapshot(base_url: str) -> dict[str, dict[str, float]] | None:
    """The histograms as the deploy stage leaves a new server, before it takes traffic: the
    first monitoring round measures from here, so the deploy's own requests (the first,
    cold one can take 20 s on a CPU) are not counted as production latency."""
    try:
        return scrape(base_url)
    except httpx.HTTPError:
        return None
