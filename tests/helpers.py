"""Helpers for tests that start servers: find and clean up what a deployment left running."""

from __future__ import annotations

import httpx

from quantflow.processes import group_members
from quantflow.serving.process import stop_record
from quantflow.serving.registry import DeploymentRegistry


def stop_deployment(name: str) -> None:
    registry = DeploymentRegistry()
    record = registry.active(name)
    if record:
        stop_record(record)
        registry.clear(name)


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
