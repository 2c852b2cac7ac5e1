"""What each stage returns: small, JSON-able records that point into the artifact store.

Prefect persists these as task results; the large files they describe stay in the store.
Fields in VOLATILE (timestamps, resource usage) are left out of cache keys, so a stage
recomputed with identical output does not invalidate everything downstream.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from quantflow.config import ModelSpec
from quantflow.storage.hashing import digest_of

VOLATILE = {"created_at", "usage"}
# What a stage measured rather than what the next stage's output depends on: the
# baseline's answers to the serving probes (read by deploy and monitor only) and the digest
# of its metrics. Out of downstream cache keys (a new probe prompt or a new held-out text
# must not re-quantize), but part of outputs_key, which says whose files a folder holds.
NOT_KEYED = {"golden", "baseline_digest"}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str
    created_at: str = Field(default_factory=now)
    versions: dict[str, Any] = {}
    usage: dict[str, Any] = {}

    def key_data(self) -> dict:
        return self.model_dump(mode="json", exclude=VOLATILE | NOT_KEYED)

    def outputs_key(self) -> str:
        return digest_of(self.model_dump(mode="json", exclude=VOLATILE))


class CheckpointManifest(Manifest):
    stage: str = "checkpoint"
    model: ModelSpec
    local_path: str  # where this machine found the checkpoint
    shards: dict[str, str]  # file name -> sha256
    fingerprint: str  # digest of shard hashes + config.json
    architecture: dict[str, Any]
    baseline_uri: str  # baseline_metrics.json
    tokenizer_uri: str  # the checkpoint's tokenizer files, copied into the store
    logprobs_uri: str | None = None  # baseline next-token log-probs for the KL check
    # Digest of the baseline's measurements (log-probs included by sha256): a cached
    # manifest whose baseline_metrics.json was since rewritten by another run no longer
    # matches the folder's marker, so it is recomputed instead of compared against.
    baseline_digest: str | None = None
    prequantized: bool = False
    # The baseline's greedy answers to the health-check and probe prompts: what a served
    # model is compared against when a probe names no expected text.
    golden: list[dict[str, Any]] = []


class CalibrationManifest(Manifest):
    stage: str = "calibration"
    uri: str
    sha256: str
    num_samples: int
    seq_len: int
    source: dict[str, Any]
    stats: dict[str, Any]
    warnings: list[str] = []


class QuantizedManifest(Manifest):
    stage: str = "quantize"
    uri: str  # quantized_model/ folder
    files: dict[str, str]  # relative path -> sha256
    label: str
    method: str
    entry_point: str  # oneshot | model_free_ptq | none (prequantized)
    recipe: str | None
    quantization_format: str | None
    size_bytes: int
    baseline_size_bytes: int
    # MoE: calibration tokens routed to each expert (expert_coverage.py); None when dense.
    expert_coverage: dict | None = None

    @property
    def checkpoint_sha256(self) -> str:
        return digest_of(self.files)


class ValidationManifest(Manifest):
    stage: str = "validate"
    report_uri: str
    report_sha256: str  # of the report file as written: an edited report no longer matches
    overall_pass: bool
    checkpoint_sha256: str
    failed_checks: list[str] = []
    summary: str = ""
    # sha256 of the model card (README.md) written into the quantized checkpoint folder.
    card_sha256: str | None = None
