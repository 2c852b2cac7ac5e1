"""Which requests the monitor's p99 counts: vLLM's histograms between two scrapes of the same
server, starting from the deploy stage's scrape at release, so the deploy's own requests (the
first, cold one took 15-20 s on a fresh 2-core host) raise no latency alert."""

from __future__ import annotations

from quantflow.monitoring.monitor import latency_baseline, server_id
from quantflow.monitoring.state import MonitorState
from quantflow.monitoring.vllm_metrics import quantile

E2E = "vllm:e2e_request_latency_seconds"


def buckets(**counts: float) -> dict[str, float]:
    """Cumulative counts by upper bound: buckets(b0_5=3, b20=4, inf=4)."""
    return {("+Inf" if k == "inf" else k[1:].replace("_", ".")): v for k, v in counts.items()}


# The demo's server at release: health check (cold, 15-20 s) and fidelity windows (fast).
AT_RELEASE = buckets(b0_5=9, b20=10, inf=10)
# After the first monitoring round's four probes, all under 0.5 s.
AFTER_PROBES = buckets(b0_5=13, b20=14, inf=14)


def test_the_p99_between_two_scrapes_counts_only_the_requests_between_them():
    assert quantile({}, AFTER_PROBES, 0.99) == 20.0  # from the server's start: the cold request
    assert quantile(AT_RELEASE, AFTER_PROBES, 0.99) == 0.5  # from the release: the probes only
    assert quantile(AFTER_PROBES, AFTER_PROBES, 0.99) is None  # no request in the window


def test_counters_that_fell_are_a_restarted_server_counted_from_zero():
    restarted = buckets(b0_5=1, b20=2, inf=2)
    assert quantile(AFTER_PROBES, restarted, 0.99) == 20.0
    assert quantile(AFTER_PROBES, restarted, 0.5) == 0.5


def record(revision: int, pid: int) -> dict:
    return {"revision": revision, "pid": pid, "base_url": "http://127.0.0.1:8000",
            "upstream_url": f"http://127.0.0.1:{20000 + pid}", "vllm_snapshot": {E2E: AT_RELEASE}}


def test_the_first_round_measures_from_the_release_and_later_ones_from_the_last_round():
    live = record(1, 11)
    fresh = MonitorState(deployment="demo")
    assert latency_baseline(fresh, live) == {E2E: AT_RELEASE}
    seen = MonitorState(deployment="demo", vllm_snapshot={E2E: AFTER_PROBES}, vllm_snapshot_server=server_id(live))
    assert latency_baseline(seen, live) == {E2E: AFTER_PROBES}
    # A rollout put revision 2 on a new server: the last round's scrape was of the old one.
    assert latency_baseline(seen, record(2, 12)) == {E2E: AT_RELEASE}
    # A record from before release snapshots were taken (or a Kubernetes one): from zero.
    assert latency_baseline(fresh, {k: v for k, v in live.items() if k != "vllm_snapshot"}) == {}
