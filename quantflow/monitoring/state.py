"""Monitoring state that survives restarts: probe history, metric values, alert counts.

Stored as one JSON document in the artifact store (local folder or S3), so a monitor on
another machine, or after a restart, continues the same rolling window.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from quantflow.storage.store import ArtifactStore

# Seconds; covers sub-100 ms CPU completions up to multi-second long generations.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
HISTORY_LIMIT = 1000


class Histogram(BaseModel):
    buckets: list[float] = list(LATENCY_BUCKETS)
    counts: list[int] = Field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    count: int = 0
    sum: float = 0.0

    def observe(self, value: float) -> None:
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1
        self.count += 1
        self.sum += value


class MonitorState(BaseModel):
    deployment: str
    model: str = ""
    quantization: str = ""
    history: list[dict[str, Any]] = []  # one entry per probe: time, prompt, score, latency
    quality_score: float | None = None  # mean score of the last `window` probes
    throughput_tps: float | None = None
    latency: dict[str, Histogram] = {}  # operation -> histogram
    alerts: dict[str, int] = {}  # severity -> count
    alert_log: list[dict[str, Any]] = []
    vllm_snapshot: dict[str, Any] | None = None  # last scrape of vLLM's latency histogram
    vllm_snapshot_server: str | None = None  # the server it came from (server_id)

    def observe_latency(self, operation: str, seconds: float) -> None:
        self.latency.setdefault(operation, Histogram()).observe(seconds)

    def add_probes(self, results: list[dict[str, Any]], window: int) -> float:
        self.history = (self.history + results)[-HISTORY_LIMIT:]
        recent = [r["score"] for r in self.history[-window:]]
        self.quality_score = sum(recent) / len(recent)
        return self.quality_score


STATE_FILE = "state.json"


def load_state(store: ArtifactStore, deployment: str) -> MonitorState:
    if store.exists(STATE_FILE):
        return MonitorState.model_validate(store.read_json(STATE_FILE))
    return MonitorState(deployment=deployment)


def save_state(store: ArtifactStore, state: MonitorState) -> None:
    store.write_json(STATE_FILE, state.model_dump(mode="json"))
