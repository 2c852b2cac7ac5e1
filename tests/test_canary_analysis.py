"""A canary step's verdict from nginx's access-log lines and the mirrored comparison (the
rollouts themselves, against real servers: test_canary.py)."""

from __future__ import annotations

import pytest

from quantflow.config.serving import RolloutConfig
from quantflow.serving.canary import AccessLog, Side, judge
from quantflow.serving.proxy import render_shadow, render_upstream

LIVE, CANARY = 41001, 41002


def line(path: str, status: int, upstream: str, statuses: str, rt: float, method: str = "POST") -> str:
    """One line in the format serving/proxy.py gives nginx."""
    return (f'127.0.0.1 [06/Dec/2026:07:00:00 +0000] "{method} {path} HTTP/1.1" {status} 120 '
            f"upstream={upstream} rt={rt:.3f} ustatus={statuses}\n")


def test_each_attempt_counts_for_its_server_and_a_resent_one_for_both(tmp_path):
    log = tmp_path / "access.log"
    log.write_text(line("/v1/completions", 200, f"127.0.0.1:{LIVE}", "200", 9.0))  # before the step
    access = AccessLog(log, {"live": LIVE, "canary": CANARY})
    with open(log, "a") as fh:
        fh.write(line("/v1/completions", 200, f"127.0.0.1:{LIVE}", "200", 0.5))
        fh.write(line("/v1/completions", 200, f"127.0.0.1:{CANARY}", "200", 0.7))
        # The canary died mid-request: nginx resent it to the live server, the client got 200.
        fh.write(line("/v1/completions", 200, f"127.0.0.1:{CANARY}, 127.0.0.1:{LIVE}", "502, 200", 1.1))
        fh.write(line("/health", 200, f"127.0.0.1:{CANARY}", "200", 0.01, method="GET"))  # not a completion
        fh.write(line("/v1/chat/completions", 200, f"127.0.0.1:{CANARY}", "200", 0.9)[:40])  # half written
    sides = {"live": Side(), "canary": Side()}
    access.read(sides)
    assert (sides["live"].attempts, sides["live"].errors, sides["live"].latencies) == (2, 0, [0.5, 1.1])
    assert (sides["canary"].attempts, sides["canary"].errors, sides["canary"].latencies) == (2, 1, [0.7])
    with open(log, "a") as fh:  # the rest of the half-written line
        fh.write(line("/v1/chat/completions", 200, f"127.0.0.1:{CANARY}", "200", 0.9)[40:])
    access.read(sides)
    assert sides["canary"].latencies == [0.7, 0.9]


def sides_with(canary_latencies: list[float], canary_errors: int = 0, live_latencies: list[float] | None = None):
    canary = Side(attempts=len(canary_latencies) + canary_errors, errors=canary_errors, latencies=canary_latencies)
    live = live_latencies or [1.0] * 20
    return {"live": Side(attempts=len(live), latencies=live), "canary": canary}


@pytest.mark.parametrize("sides, shadow, pre_p99, passed, why", [
    (sides_with([1.0] * 20), {"compared": 10, "agreed": 10}, None, True, "passed"),
    (sides_with([1.0] * 19, canary_errors=1), None, None, False, "canary error rate 5.0% (1 of 20 attempts)"),
    (sides_with([1.0] * 19 + [3.5]), None, None, False, "canary p99 latency 3.50s above 3.00s (the live server's p99"),
    (sides_with([1.0] * 19 + [3.5]), None, 2.0, True, "passed"),  # the pre-deploy p99 x 3 = 6 s
    (sides_with([1.0] * 20), {"compared": 10, "agreed": 8}, None, False, "agreed with the live model's on 80% of 10"),
])
def test_a_step_fails_on_errors_latency_or_disagreement_naming_the_setting(sides, shadow, pre_p99, passed, why):
    ok, reason, _ = judge(RolloutConfig(strategy="canary"), sides, shadow, pre_p99)
    assert ok is passed and why in reason, reason


def test_nginx_gets_a_weighted_split_and_a_bounded_mirror():
    upstream = render_upstream(LIVE, (CANARY, 10))
    assert f"server 127.0.0.1:{LIVE} weight=90" in upstream and f"server 127.0.0.1:{CANARY} weight=10" in upstream
    assert render_upstream(LIVE).count("server 127.0.0.1:") == 1
    files = render_shadow(41003, 0.25)
    assert "25.00% 1;" in files["shadow_http.conf"] and '* "";' in files["shadow_http.conf"]
    assert "proxy_pass http://127.0.0.1:41003$request_uri;" in files["shadow_server.conf"]
    assert '* "";' not in render_shadow(41003, 1.0)["shadow_http.conf"]  # every request: no remainder
