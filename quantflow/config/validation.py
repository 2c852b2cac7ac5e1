"""Stage 4 settings: which checks judge the quantized model, and each one's threshold."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from quantflow.config.base import StrictModel
from quantflow.config.model import TextSource


class PerplexityCheck(StrictModel):
    enabled: bool = True
    source: TextSource = TextSource(dataset="wikitext", subset="wikitext-2-raw-v1", split="test")
    # Tokens per forward pass (capped at the model's context length).
    window: int = Field(default=2048, ge=16)
    # Tokens advanced between windows. None = window: disjoint windows, each token scored
    # once with the tokens before it in its window as context (lm-eval's rolling scheme).
    # A smaller stride gives every scored token at least window - stride tokens of context.
    stride: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=4, ge=1)
    # Score only the first N tokens of the text (quick runs); None = all of it.
    max_tokens: int | None = Field(default=None, ge=16)
    # Gate: largest allowed relative increase of perplexity, in percent.
    max_increase_pct: float = Field(default=10.0, ge=0)

    @model_validator(mode="after")
    def _stride_fits(self) -> "PerplexityCheck":
        if self.stride is not None and self.stride > self.window:
            raise ValueError(f"validation.perplexity.stride ({self.stride}) must be <= window "
                             f"({self.window}), or tokens between windows are never scored")
        return self


class LmEvalTask(StrictModel):
    name: str = Field(min_length=1)  # an lm-eval task or group name, e.g. "mmlu", "gsm8k"
    metric: str = "acc"  # metric in lm-eval's results, e.g. acc, acc_norm, exact_match
    filter: str = "none"  # lm-eval filter the metric was computed under ("strict-match" …)
    num_fewshot: int | None = Field(default=None, ge=0)
    # Pass when quantized / baseline >= min_recovery (0.95 = the usual 5% tolerance) …
    min_recovery: float | None = Field(default=0.95, gt=0)
    # … and, if set, when baseline - quantized <= max_drop (absolute, metric units).
    max_drop: float | None = Field(default=None, ge=0)


class LmEvalCheck(StrictModel):
    enabled: bool = False
    tasks: list[LmEvalTask] = [
        LmEvalTask(name="mmlu", num_fewshot=5),
        LmEvalTask(name="gsm8k", metric="exact_match", filter="strict-match", num_fewshot=5),
    ]
    # Folder of extra task YAMLs (offline suites over local files).
    include_path: str | None = None
    # hf: transformers in this process; vllm: vLLM in this process (GPU);
    # local-completions: a temporary vLLM server from the serving environment.
    backend: Literal["hf", "vllm", "local-completions"] = "hf"
    # Examples per task (int) or fraction (float < 1) for quick runs; None = all.
    limit: int | float | None = Field(default=None, gt=0)
    batch_size: int = Field(default=8, ge=1)
    # Context length lm-eval uses; None = the model's max_position_embeddings.
    max_length: int | None = Field(default=None, ge=16)

    @model_validator(mode="after")
    def _has_tasks(self) -> "LmEvalCheck":
        if self.enabled and not self.tasks:
            raise ValueError("validation.lm_eval.tasks is empty: name at least one task or "
                             "set validation.lm_eval.enabled: false")
        return self


class ConsistencyCheck(StrictModel):
    enabled: bool = True
    # Prompts whose greedy continuations are compared token for token.
    prompts: list[str] = [
        "The capital of France is",
        "def fibonacci(n):",
        "Water boils at a temperature of",
        "The three primary colors are",
        "Question: What is 12 times 12?\nAnswer:",
    ]
    max_new_tokens: int = Field(default=32, ge=1)
    # Gate: fraction of prompts whose greedy output must match the baseline exactly.
    # None reports the rate without gating on it.
    min_exact_match: float | None = Field(default=None, ge=0, le=1)
    # Tokens of held-out text over which next-token KL(baseline || quantized) is averaged.
    # The baseline's log-probabilities are stored (tokens x vocab, float16).
    kl_tokens: int = Field(default=1024, ge=16)
    max_kl: float | None = Field(default=0.1, ge=0)


class PerformanceCheck(StrictModel):
    """Serve the baseline and the quantized model with the deploy settings on this target
    and drive both with vLLM's own benchmark (`vllm bench serve`, random prompts)."""
    enabled: bool = False
    # Load levels: requests in flight at once (--max-concurrency), one benchmark per level.
    concurrency: list[int] = Field(default=[1, 4], min_length=1)
    num_prompts: int = Field(default=16, ge=1)  # requests per level
    input_len: int = Field(default=32, ge=1)  # random prompt tokens
    output_len: int = Field(default=16, ge=1)  # generated tokens (EOS ignored)
    # Optional gate, at the highest load level; None = report only.
    min_throughput_ratio: float | None = Field(default=None, gt=0)  # quantized / baseline output tok/s
    max_p99_ttft_ms: float | None = Field(default=None, gt=0)  # quantized p99 time to first token
    max_p99_tpot_ms: float | None = Field(default=None, gt=0)  # quantized p99 time per output token

    @model_validator(mode="after")
    def _levels(self) -> "PerformanceCheck":
        if any(c < 1 for c in self.concurrency):
            raise ValueError("validation.performance.concurrency: every level must be >= 1 request in flight")
        return self

    @property
    def gated(self) -> bool:
        return any(v is not None for v in (self.min_throughput_ratio, self.max_p99_ttft_ms, self.max_p99_tpot_ms))


class ServedFidelityCheck(StrictModel):
    """Before a rollout switches traffic, the new server's perplexity on a slice of the
    held-out text (vLLM's prompt log-probabilities) must match what validate measured on the
    same token windows: a loader fault in either engine (weights silently dropped or left
    random) moves it by orders of magnitude; engine and kernel differences by a few percent."""

    enabled: bool = True
    windows: int = Field(default=8, ge=1, le=256)  # disjoint windows from the held-out text's start
    window: int = Field(default=128, ge=8)  # tokens per window (must fit deploy.max_model_len)
    # Largest allowed |served - validated| / validated perplexity, in percent.
    max_delta_pct: float = Field(default=5.0, gt=0)


class ValidationConfig(StrictModel):
    perplexity: PerplexityCheck = PerplexityCheck()
    lm_eval: LmEvalCheck = LmEvalCheck()
    consistency: ConsistencyCheck = ConsistencyCheck()
    performance: PerformanceCheck = PerformanceCheck()
    served_fidelity: ServedFidelityCheck = ServedFidelityCheck()
    # After a pass, suspend the flow until someone approves or rejects it in the Prefect UI.
    require_approval: bool = False
    approval_timeout_s: int = Field(default=24 * 3600, ge=60)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Precision both models are evaluated in (the same for both, always).
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def for_baseline(self) -> "ValidationConfig":
        """What stage 1 measures the baseline with: the quality settings only. Serving
        performance has its own baseline cache (quantflow/serving/performance.py), so a
        changed load level or gate never re-runs the baseline's quality evaluation."""
        return self.model_copy(update={"performance": PerformanceCheck(),
                                       "served_fidelity": ServedFidelityCheck()})
