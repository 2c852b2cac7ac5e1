"""A canary rollout behind the deployment's nginx: traffic moves to the new server in steps,
and each step is judged on the requests it actually got before the next one.

At each step below 100 nginx splits new requests by weight between the live server and the
canary, and mirrors a share of them to the shadow comparison (serving/shadow.py). The step
holds for `analysis_window_s`, and until the canary has answered `min_requests` (and the
comparison has `mirror.min_compared`), then is judged from nginx's access log and the
comparison:
- error rate: the canary's failed attempts (HTTP 5xx, refused or cut connections) over its
  attempts; nginx resends a failed attempt to the live server, so clients do not see them;
- p99 latency of the requests the canary answered, against the pre-deploy p99 when
  validation measured one, else the live server's p99 in the same step, times
  `latency_tolerance`;
- first-token agreement with the live model on the mirrored requests.
A dead canary fails the step at once. Step 100 is the promotion; the caller switches to it.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from quantflow.config.serving import RolloutConfig

log = logging.getLogger("quantflow.deploy")
LINE = re.compile(r'"(?P<method>\S+) (?P<path>\S+)[^"]*" (?P<status>\d+) \d+ upstream=(?P<up>.*?) '
                  r'rt=(?P<rt>[\d.]+) ustatus=(?P<us>.*)$')


class CanaryFailed(Exception):
    def __init__(self, reason: str, steps: list[dict]):
        super().__init__(reason)
        self.reason, self.steps = reason, steps


@dataclass
class Side:
    attempts: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)  # requests this side answered

    def p99(self) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]

    def summary(self) -> dict[str, Any]:
        p99 = self.p99()
        return {"attempts": self.attempts, "answered": len(self.latencies), "errors": self.errors,
                "error_rate": round(self.errors / self.attempts, 4) if self.attempts else None,
                "p99_s": round(p99, 3) if p99 is not None else None}


class AccessLog:
    """The completions nginx served since a point in its access log, per server."""

    def __init__(self, path: Path, ports: dict[str, int]):
        self.path = path
        self.sides = {f"127.0.0.1:{port}": side for side, port in ports.items()}
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = ""

    def read(self, into: dict[str, Side]) -> None:
        try:
            with open(self.path, errors="replace") as fh:
                fh.seek(self.offset)
                text = fh.read()
                self.offset = fh.tell()
        except OSError:
            return
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()  # a line nginx is still writing
        for line in lines:
            m = LINE.search(line)
            if not m or m["method"] != "POST" or not m["path"].startswith("/v1/"):
                continue  # health checks, model lists
            addrs, statuses = m["up"].split(", "), m["us"].split(", ")
            for i, addr in enumerate(addrs):
                side = self.sides.get(addr.strip())
                if side is None:
                    continue
                status = statuses[i].strip() if i < len(statuses) else "-"
                into[side].attempts += 1
                last = i == len(addrs) - 1
                if not status.isdigit() or int(status) >= 500:
                    into[side].errors += 1
                elif last and int(m["status"]) < 500:
                    into[side].latencies.append(float(m["rt"]))


def judge(cfg: RolloutConfig, sides: dict[str, Side], shadow: dict | None,
          pre_deploy_p99_s: float | None) -> tuple[bool, str, float | None]:
    """(passed, why, the latency limit used) for one step's numbers."""
    canary, live = sides["canary"], sides["live"]
    rate = canary.errors / canary.attempts if canary.attempts else 0.0
    if rate > cfg.max_error_rate:
        return False, (f"canary error rate {rate:.1%} ({canary.errors} of {canary.attempts} attempts) "
                       f"above deploy.rollout.max_error_rate {cfg.max_error_rate:.1%}"), None
    reference = pre_deploy_p99_s if pre_deploy_p99_s else live.p99()
    limit = reference * cfg.latency_tolerance if reference else None
    p99 = canary.p99()
    if limit is not None and p99 is not None and p99 > limit:
        against = "the pre-deploy p99" if pre_deploy_p99_s else "the live server's p99"
        return False, (f"canary p99 latency {p99:.2f}s above {limit:.2f}s ({against} {reference:.2f}s "
                       f"x deploy.rollout.latency_tolerance {cfg.latency_tolerance:g})"), limit
    if shadow is not None and cfg.mirror.share > 0 and shadow["compared"]:
        agreement = shadow["agreed"] / shadow["compared"]
        if agreement < cfg.mirror.min_agreement:
            return False, (f"canary's first token agreed with the live model's on {agreement:.0%} of "
                           f"{shadow['compared']} mirrored requests, below deploy.rollout.mirror.min_agreement "
                           f"{cfg.mirror.min_agreement:.0%}"), limit
    return True, "passed", limit


def hold_step(cfg: RolloutConfig, percent: int, access: AccessLog, comparer: Any,
              canary_alive: Callable[[], bool], pre_deploy_p99_s: float | None,
              progress: Callable[[str], None] = log.info) -> dict:
    """Hold one step (the split already set) until it can be judged; the step's record.
    Raises CanaryFailed (with the record) when the step fails or the canary dies."""
    start = time.monotonic()
    sides = {"live": Side(), "canary": Side()}
    last_report = start
    shadow: dict | None = None
    while True:
        time.sleep(0.5)
        access.read(sides)
        shadow = comparer.snapshot() if comparer is not None else None
        held = time.monotonic() - start
        record = {"percent": percent, "held_s": round(held, 1),
                  "live": sides["live"].summary(), "canary": sides["canary"].summary(),
                  "mirrored": _shadow_summary(shadow)}
        if not canary_alive():
            record.update(passed=False, reason="the canary server exited during the step")
            raise CanaryFailed(record["reason"], [record])
        canary = sides["canary"]
        if canary.attempts >= cfg.min_requests and canary.errors / canary.attempts > cfg.max_error_rate:
            # Enough requests to judge, and already failing: no need to hold the window out.
            ok, why, limit = judge(cfg, sides, shadow, pre_deploy_p99_s)
            record.update(passed=False, reason=why, latency_limit_s=limit)
            raise CanaryFailed(why, [record])
        enough_shadow = (shadow is None or cfg.mirror.share == 0
                         or shadow["compared"] >= cfg.mirror.min_compared)
        if held >= cfg.analysis_window_s and len(canary.latencies) >= cfg.min_requests and enough_shadow:
            ok, why, limit = judge(cfg, sides, shadow, pre_deploy_p99_s)
            record.update(passed=ok, reason=why, latency_limit_s=limit)
            if not ok:
                raise CanaryFailed(why, [record])
            return record
        if held > cfg.max_hold_s:
            why = (f"too little traffic to judge the canary: {len(canary.latencies)} of "
                   f"deploy.rollout.min_requests {cfg.min_requests} answered"
                   + (f", {shadow['compared']} of deploy.rollout.mirror.min_compared {cfg.mirror.min_compared} "
                      "compared" if not enough_shadow and shadow else "")
                   + f" in {held:.0f}s (deploy.rollout.max_hold_s {cfg.max_hold_s:g})")
            record.update(passed=False, reason=why)
            raise CanaryFailed(why, [record])
        if time.monotonic() - last_report >= 10:
            last_report = time.monotonic()
            progress(f"canary at {percent}%: {held:.0f}s held, {len(canary.latencies)} answered by the canary, "
                     f"{len(sides['live'].latencies)} by the live server"
                     + (f", {shadow['compared']} mirrored compared" if shadow else ""))


def _shadow_summary(shadow: dict | None) -> dict | None:
    if shadow is None:
        return None
    compared = shadow["compared"]
    return {**shadow, "agreement": round(shadow["agreed"] / compared, 4) if compared else None}
