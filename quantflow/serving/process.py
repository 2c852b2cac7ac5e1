"""Start, watch and stop one vLLM OpenAI-compatible server process.

Servers run in their own session (process group) so that one signal reaches the API
server, its engine core and workers. Stopping sends SIGTERM twice (a server still
starting can ignore the first), then SIGKILL, and checks the group is gone.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from quantflow.config import DeployConfig
from quantflow.processes import group_members, reused, start_detached, stop_groups

LOG_TAIL_LINES = 25
# Lines printed by every vLLM exit (nanobind leak reports) that hide the real error.
NOISE = re.compile(r"nanobind|^ - (leaked|\.\.\.)|resource_tracker|warnings\.warn")
# What vLLM says once an engine process has died: wrappers that point elsewhere.
WRAPPER = re.compile(r"See root cause above|See stack trace for root cause|initialization failed|"
                     r"EngineDeadError|Failed core proc")
# An exception that opens a line's message: bare (a traceback's last line) or after vLLM's
# "(EngineCore pid=1) ERROR 12-02 18:22:40 [core.py:1510] " prefix. Not WARNING text that
# merely mentions one.
EXCEPTION_LINE = re.compile(r"^(?:\((?P<proc>\w+)[^)]*\)\s+)?(?:ERROR\s+\S+\s+\S+\s+\[[^\]]*\]\s+)?"
                            r"(?P<exc>[\w.]*(?:Error|Exception)\b: .*)")
ENGINE_PROCS = ("EngineCore", "Worker")
MENTION = re.compile(r"\b\w*(Error|Exception)\b: ")


def root_cause(lines: list[str]) -> str | None:
    """The first exception an engine process raised (its EngineCore or Worker lines). The
    API server then re-raises wrappers ("Engine core initialization failed. See root cause
    above") that name nothing; they are the fallback only when nothing else is there."""
    found = [(m.group("proc") or "", m.group("exc").strip()) for m in map(EXCEPTION_LINE.match, lines) if m]
    causes = [(proc, exc) for proc, exc in found if not WRAPPER.search(exc)]
    engine = [exc for proc, exc in causes if proc.startswith(ENGINE_PROCS)]
    first = (engine or [exc for _, exc in causes] or [exc for _, exc in found] or [None])[0]
    if first is None:  # a format not seen before: the last line that names an exception at all
        mentions = [ln.strip() for ln in lines if MENTION.search(ln)]
        first = mentions[-1] if mentions else None
    return first


@dataclass
class ServerSpec:
    model_dir: str
    served_model_name: str
    host: str
    port: int
    python: str
    device: str  # "cpu" or "cuda"
    log_path: str
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def port_free(host: str, port: int) -> bool:
    host = "127.0.0.1" if host == "localhost" else host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def engine_args(cfg: DeployConfig, max_model_len: int | None) -> list[str]:
    """vLLM engine flags from the serving settings (shared by local and Kubernetes serving)."""
    args = ["--dtype", cfg.dtype, "--tensor-parallel-size", str(cfg.tensor_parallel_size)]
    if max_model_len:
        args += ["--max-model-len", str(max_model_len)]
    if cfg.max_num_seqs:
        args += ["--max-num-seqs", str(cfg.max_num_seqs)]
    if cfg.max_num_batched_tokens:
        args += ["--max-num-batched-tokens", str(cfg.max_num_batched_tokens)]
    if cfg.enable_chunked_prefill is not None:
        args.append("--enable-chunked-prefill" if cfg.enable_chunked_prefill
                    else "--no-enable-chunked-prefill")
    return args


def vllm_args(cfg: DeployConfig, device: str, max_model_len: int | None) -> list[str]:
    args = engine_args(cfg, max_model_len) + ["--disable-uvicorn-access-log"]
    if device == "cpu":
        # An explicit KV-cache size plus eager mode skips vLLM's warm-up and compilation:
        # ~15 s to healthy instead of ~80 s, and the cache is not sized from host memory.
        args += ["--enforce-eager", "--kv-cache-memory-bytes", str(int(cfg.cpu_kv_cache_gib * 2**30))]
    else:
        args += ["--gpu-memory-utilization", str(cfg.gpu_memory_utilization)]
    return args + list(cfg.extra_args)


def vllm_env(device: str) -> dict[str, str]:
    """The environment any vLLM process of quantflow's starts with (servers, kernel probes)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "PREFECT_"))}
    env.update(HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"), TOKENIZERS_PARALLELISM="false")
    if device == "cpu":
        # Engine in-process: one fewer interpreter to start (faster, ~0.6 GB less memory).
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def server_env(spec: ServerSpec, api_key: str | None) -> dict[str, str]:
    env = vllm_env(spec.device)
    if api_key:
        env["VLLM_API_KEY"] = api_key  # via the environment: never visible in `ps`
    env.update(spec.env)
    return env


class VllmServer:
    def __init__(self, spec: ServerSpec, pid: int | None = None, create_time: float | None = None):
        self.spec = spec
        self.pid = pid
        self.create_time = create_time
        self._proc: subprocess.Popen | None = None

    def start(self, api_key: str | None) -> "VllmServer":
        cmd = [self.spec.python, "-m", "vllm.entrypoints.openai.api_server",
               "--model", self.spec.model_dir, "--served-model-name", self.spec.served_model_name,
               "--host", self.spec.host, "--port", str(self.spec.port), *self.spec.args]
        Path(self.spec.log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.spec.log_path, "ab") as log:
            log.write(f"\n$ {' '.join(cmd)}\n".encode())
        self._proc, started = start_detached(cmd, Path(self.spec.log_path), server_env(self.spec, api_key))
        self.pid, self.create_time = started["pid"], started["create_time"]
        return self

    def exit_code(self) -> int | None:
        if self._proc is not None:
            return self._proc.poll()
        return None if self.alive() else -1

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        if not self.pid or reused(self.pid, self.create_time):
            return False
        return self.pid in group_members(self.pid)

    def wait_healthy(self, timeout_s: float, progress=None) -> None:
        """Poll /health until 200; raise ServerFailed if the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        last_note = 0.0
        while time.monotonic() < deadline:
            code = self.exit_code()
            if code is not None:
                raise ServerFailed(f"vLLM exited with code {code} before becoming healthy",
                                   self.log_tail())
            try:
                if httpx.get(self.spec.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if progress and time.monotonic() - last_note > 15:
                last_note = time.monotonic()
                progress(f"waiting for vLLM on {self.spec.base_url} "
                         f"({int(timeout_s - (deadline - time.monotonic()))}s)")
            time.sleep(0.5)
        raise ServerFailed(f"vLLM did not become healthy within {timeout_s:.0f}s", self.log_tail())

    def stop(self, timeout_s: float = 10) -> None:
        if not self.pid:
            return
        stop_groups([{"pid": self.pid, "create_time": self.create_time}], waits=(timeout_s, 5, 5),
                    on_wait=self._reap)
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.poll()  # collect our own child so it does not linger as a zombie

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The root-cause error line (if any) and the last lines, without exit noise."""
        try:
            text = Path(self.spec.log_path).read_text(errors="replace")
        except OSError:
            return "(no log)"
        kept = [ln for ln in text.splitlines() if not NOISE.search(ln)]
        cause = root_cause(kept)
        tail = kept[-lines:]
        if cause:
            tail = [f"root cause: {cause}", "..."] + tail
        return "\n".join(tail)

    def record(self) -> dict:
        return {**asdict(self.spec), "pid": self.pid, "create_time": self.create_time,
                "base_url": self.spec.base_url}


def server_of(record: dict) -> VllmServer:
    """The server a deployment record describes (to check on it or stop it)."""
    spec = ServerSpec(**{k: record[k] for k in ServerSpec.__dataclass_fields__})
    return VllmServer(spec, pid=record["pid"], create_time=record.get("create_time"))


def stop_record(record: dict, proxy: bool = True) -> None:
    """Stop a deployment's server and, unless a rollout keeps it (proxy=False), its nginx."""
    server_of(record).stop()
    if proxy:
        from quantflow.serving.proxy import stop_proxy

        stop_proxy(record)


class ServerFailed(Exception):
    def __init__(self, message: str, log_tail: str):
        self.log_tail = log_tail
        super().__init__(f"{message}\n--- server log (last lines) ---\n{log_tail}")
