"""Progress of long stages: a Prefect progress artifact on the run (the UI's Artifacts tab and
run page) and a `quantflow.progress` log line (the CLI prints one line per stage).

On a real model stage 1 hashes hundreds of GB and evaluates for hours, quantize calibrates
decoder layer after decoder layer, validate scores thousands of perplexity windows; without
this the UI shows only "Running". A stage declares its phases; the libraries doing the work
report `(phase, done, total)` through `report()`, which finds the stage's tracker in a context
variable, so evaluation and quantization code need no Prefect handle passed down and stay
usable outside a run (report() is then a no-op).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

log = logging.getLogger("quantflow.progress")
_CURRENT: contextvars.ContextVar["StageProgress | None"] = contextvars.ContextVar("quantflow_progress",
                                                                                 default=None)
# Prefect API calls and log lines are throttled: a perplexity pass reports every batch.
MIN_INTERVAL_S = 2.0
MIN_STEP_PCT = 10.0


@dataclass
class StageProgress:
    stage: str
    phases: list[str]
    history: list[float] = field(default_factory=list)  # every percentage published
    _artifact_id: object | None = None
    _last_pct: float = -1.0
    _last_t: float = 0.0

    def fraction(self, phase: str, done: int, total: int) -> float:
        index = self.phases.index(phase)
        within = min(done, total) / total if total > 0 else 1.0
        return (index + within) / len(self.phases)

    def update(self, phase: str, done: int, total: int, what: str = "") -> None:
        if phase not in self.phases:
            # Not this stage's work (a search's own tracker sees its candidates' library
            # calls made outside their stages): counting it would move the wrong bar.
            return
        pct = round(100.0 * self.fraction(phase, done, total), 1)
        now = time.monotonic()
        if pct < 100.0 and (pct - self._last_pct < MIN_STEP_PCT and now - self._last_t < MIN_INTERVAL_S
                            or pct <= self._last_pct):
            return
        self._publish(pct, what or f"{phase} {done} of {total}")

    def finish(self) -> None:
        if self._last_pct < 100.0:
            self._publish(100.0, "done")

    def _publish(self, pct: float, detail: str) -> None:
        self._last_pct, self._last_t = pct, time.monotonic()
        self.history.append(pct)
        description = f"{self.stage}: {detail}"
        log.info("%s %5.1f%% %s", self.stage, pct, detail, extra={"quantflow_stage": self.stage,
                                                                 "quantflow_pct": pct})
        self._artifact(pct, description)

    def _artifact(self, pct: float, description: str) -> None:
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact
            from prefect.context import FlowRunContext, TaskRunContext
        except ImportError:
            return
        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return  # outside a run: the log line is the whole report
        try:
            if self._artifact_id is None:
                self._artifact_id = create_progress_artifact(progress=pct, description=description)
            else:
                update_progress_artifact(self._artifact_id, progress=pct, description=description)
        except Exception as err:  # progress is a courtesy: a slow or restarting API must not fail a stage
            log.debug("progress artifact not updated: %s", err)


@contextlib.contextmanager
def stage_progress(stage: str, phases: list[str]) -> Iterator[StageProgress]:
    """Track one stage's progress; reaches 100% when the stage's body returns."""
    tracker = StageProgress(stage, list(phases))
    token = _CURRENT.set(tracker)
    try:
        tracker._publish(0.0, "started")
        yield tracker
        tracker.finish()
    finally:
        _CURRENT.reset(token)


def report(phase: str, done: int, total: int, what: str = "") -> None:
    """From library code: `done` of `total` units of `phase` are finished; `what` replaces the
    default text "<phase> <done> of <total>". Does nothing outside a tracked stage."""
    tracker = _CURRENT.get()
    if tracker is not None:
        tracker.update(phase, done, total, what)
