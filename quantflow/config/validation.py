"""Stage 4 settings: which checks judge the quantized model, and each one's threshold."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from quantflow.config.base import StrictModel
from quantflow.config.model import TextSource


class PerplexityCheck(StrictModel):
    enabled: bool = True
    """Measure perplexity of both models on the same held-out text."""
    source: TextSource = TextSource(dataset="wikitext", subset="wikitext-2-raw-v1", split="test")
    """The held-out text perplexity is measured on (a hub data set or local files)."""
    window: int = Field(default=2048, ge=16, title="Perplexity window (tokens)", examples=[2048, 512])
    """Tokens per forward pass (capped at the model's context length)."""
    stride: int | None = Field(default=None, ge=1)
    """Tokens advanced between windows. None = window: disjoint windows, each token scored once
    with the tokens before it in its window as context (lm-eval's rolling scheme). A smaller
    stride gives every scored token at least window - stride tokens of context."""
    batch_size: int = Field(default=4, ge=1)
    """Windows per forward pass."""
    max_tokens: int | None = Field(default=None, ge=16)
    """Score only the first N tokens of the text (quick runs); None = all of it."""
    max_increase_pct: float = Field(default=10.0, ge=0,
                                    title="Max perplexity increase (%)", examples=[1.0, 10.0])
    """Gate: largest allowed relative increase of perplexity, in percent."""

    @model_validator(mode="after")
    def _stride_fits(self) -> "PerplexityCheck":
        if self.stride is not None and self.stride > self.window:
            raise ValueError(f"validation.perplexity.stride ({self.stride}) must be <= window "
                             f"({self.window}), or tokens between windows are never scored")
        return self


class LmEvalTask(StrictModel):
    name: str = Field(min_length=1)
    '''An lm-eval task or group name, e.g. "mmlu", "gsm8k".'''
    metric: str = "acc"
    """Metric in lm-eval's results, e.g. acc, acc_norm, exact_match."""
    filter: str = "none"
    '''lm-eval filter the metric was computed under ("none", "strict-match", …).'''
    num_fewshot: int | None = Field(default=None, ge=0)
    """Few-shot examples per prompt; None = the task's default."""
    min_recovery: float | None = Field(default=0.95, gt=0,
                                       title="Min recovery (quantized / baseline)", examples=[0.95, 0.99])
    """Pass when quantized / baseline >= min_recovery (0.95 = the usual 5% tolerance)."""
    max_drop: float | None = Field(default=None, ge=0,
                                   title="Max absolute drop (metric units)", examples=[0.02])
    """And, if set, when baseline - quantized <= max_drop (absolute, in the metric's units)."""


class LmEvalCheck(StrictModel):
    enabled: bool = False
    """Run lm-evaluation-harness tasks on both models and gate on each task's recovery."""
    tasks: list[LmEvalTask] = [
        LmEvalTask(name="mmlu", num_fewshot=5),
        LmEvalTask(name="gsm8k", metric="exact_match", filter="strict-match", num_fewshot=5),
    ]
    """lm-eval tasks and each one's tolerance; default MMLU and GSM8K, 5-shot."""
    include_path: str | None = None
    """Folder of extra task YAMLs (offline suites over local files)."""
    backend: Literal["hf", "vllm", "local-completions"] = "hf"
    """hf: transformers in this process; vllm: vLLM in this process (GPU); local-completions: a
    temporary vLLM server from the serving environment."""
    limit: int | float | None = Field(default=None, gt=0,
                                      title="Examples per task (count, or fraction < 1)", examples=[100, 0.1])
    """Examples per task (int) or fraction (float < 1) for quick runs; None = all."""
    batch_size: int = Field(default=8, ge=1)
    """lm-eval batch size."""
    max_length: int | None = Field(default=None, ge=16)
    """Context length lm-eval uses; None = the model's max_position_embeddings."""

    @model_validator(mode="after")
    def _has_tasks(self) -> "LmEvalCheck":
        if self.enabled and not self.tasks:
            raise ValueError("validation.lm_eval.tasks is empty: name at least one task or "
                             "set validation.lm_eval.enabled: false")
        return self


class ConsistencyCheck(StrictModel):
    enabled: bool = True
    """Compare greedy outputs and next-token distributions (KL) of the quantized model with the
    baseline's."""
    prompts: list[str] = [
        "The capital of France is",
        "def fibonacci(n):",
        "Water boils at a temperature of",
        "The three primary colors are",
        "Question: What is 12 times 12?\nAnswer:",
    ]
    """Prompts whose greedy continuations are compared token for token."""
    max_new_tokens: int = Field(default=32, ge=1)
    """Tokens generated greedily per prompt."""
    min_exact_match: float | None = Field(default=None, ge=0, le=1,
                                          title="Min greedy exact-match rate (0-1)", examples=[0.8])
    """Gate: fraction of prompts whose greedy output must match the baseline exactly. None reports
    the rate without gating on it."""
    kl_tokens: int = Field(default=1024, ge=16, title="KL tokens", examples=[1024])
    """Tokens of held-out text over which next-token KL(baseline || quantized) is averaged. The
    baseline's log-probabilities are stored (tokens x vocab, float16)."""
    max_kl: float | None = Field(default=0.1, ge=0,
                                 title="Max mean next-token KL (nats)", examples=[0.1, 0.05])
    """Gate: largest allowed mean next-token KL(baseline || quantized), in nats; None reports it
    without gating."""


class PerformanceCheck(StrictModel):
    """Serve the baseline and the quantized model with the deploy settings on this target
    and drive both with vLLM's own benchmark (`vllm bench serve`, random prompts)."""
    enabled: bool = False
    """Serve both models with the deploy settings and measure throughput, TTFT and TPOT side by
    side (adds two server starts)."""
    concurrency: list[int] = Field(default=[1, 4], min_length=1)
    """Load levels: requests in flight at once (--max-concurrency), one benchmark per level."""
    num_prompts: int = Field(default=16, ge=1)
    """Requests per load level."""
    input_len: int = Field(default=32, ge=1)
    """Random prompt tokens per request."""
    output_len: int = Field(default=16, ge=1)
    """Generated tokens per request (EOS ignored)."""
    min_throughput_ratio: float | None = Field(default=None, gt=0,
                                               title="Min throughput ratio (quantized / baseline)", examples=[1.2])
    """Optional gate at the highest load level: quantized / baseline output tokens/s must reach
    this; None = report only."""
    max_p99_ttft_ms: float | None = Field(default=None, gt=0,
                                          title="Max p99 time to first token (ms)", examples=[500])
    """Optional gate: the quantized model's p99 time to first token, in ms; None = report only."""
    max_p99_tpot_ms: float | None = Field(default=None, gt=0,
                                          title="Max p99 time per output token (ms)", examples=[50])
    """Optional gate: the quantized model's p99 time per output token, in ms; None = report only."""

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
    """Before traffic switches, compare the new server's perplexity with validate's on the same
    token windows."""
    windows: int = Field(default=8, ge=1, le=256)
    """Disjoint token windows from the start of the held-out text."""
    window: int = Field(default=128, ge=8, title="Fidelity window (tokens)", examples=[128])
    """Tokens per window (must fit deploy.max_model_len)."""
    max_delta_pct: float = Field(default=5.0, gt=0,
                                 title="Max served-vs-validated perplexity gap (%)", examples=[5.0])
    """Largest allowed |served - validated| / validated perplexity, in percent."""


class ValidationConfig(StrictModel):
    perplexity: PerplexityCheck = PerplexityCheck()
    """Perplexity on held-out text, gated on its relative increase."""
    lm_eval: LmEvalCheck = LmEvalCheck()
    """Task accuracy with lm-evaluation-harness, gated per task."""
    consistency: ConsistencyCheck = ConsistencyCheck()
    """Greedy outputs and KL divergence against the baseline."""
    performance: PerformanceCheck = PerformanceCheck()
    """Serving speed of both models on the deploy target (off by default)."""
    served_fidelity: ServedFidelityCheck = ServedFidelityCheck()
    """At deploy: the served model must measure what validate measured."""
    require_approval: bool = False
    """After a pass, suspend the flow until someone approves or rejects it in the Prefect UI."""
    approval_timeout_s: int = Field(default=24 * 3600, ge=60, title="Approval timeout (s)", examples=[86400])
    """With require_approval: seconds to wait for an answer; then the run ends without deploying."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where validation runs: cpu, cuda (refused without a GPU) or auto."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision both models are evaluated in (the same for both, always)."""

    def for_baseline(self) -> "ValidationConfig":
        """What stage 1 measures the baseline with: the quality settings only. Serving
        performance has its own baseline cache (quantflow/serving/performance.py), so a
        changed load level or gate never re-runs the baseline's quality evaluation."""
        return self.model_copy(update={"performance": PerformanceCheck(),
                                       "served_fidelity": ServedFidelityCheck()})
