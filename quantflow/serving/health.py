"""Talk to a served model: health, model list, completions (with latency and token counts)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx

from quantflow.config import CompletionCheck


class HealthCheckFailed(Exception):
    pass


@dataclass
class Completion:
    text: str
    latency_s: float
    completion_tokens: int
    prompt_tokens: int


class CompletionsClient:
    """Minimal OpenAI-compatible client: the calls quantflow makes, nothing more."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout_s: float = 60):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def health(self) -> int:
        return self.http.get("/health").status_code

    def models(self) -> list[str]:
        r = self.http.get("/v1/models")
        r.raise_for_status()
        return [m["id"] for m in r.json()["data"]]

    def complete(self, prompt: str, max_tokens: int) -> Completion:
        start = time.perf_counter()
        r = self.http.post("/v1/completions", json={"model": self.model, "prompt": prompt,
                                                     "max_tokens": max_tokens, "temperature": 0})
        latency = time.perf_counter() - start
        r.raise_for_status()
        body = r.json()
        usage = body.get("usage") or {}
        return Completion(text=body["choices"][0]["text"], latency_s=latency,
                          completion_tokens=int(usage.get("completion_tokens", 0)),
                          prompt_tokens=int(usage.get("prompt_tokens", 0)))


def answer_matches(text: str, expected: str | None) -> bool:
    if expected is None:
        return bool(text.strip())
    return expected.lower() in text.lower()


def check_endpoint(client: CompletionsClient, check: CompletionCheck) -> dict:
    """/health, then /v1/models, then a real completion with the expected answer."""
    try:
        status = client.health()
        if status != 200:
            raise HealthCheckFailed(f"/health answered {status}")
        models = client.models()
        if client.model not in models:
            raise HealthCheckFailed(f"/v1/models lists {models}, not {client.model!r}")
        done = client.complete(check.prompt, check.max_tokens)
    except httpx.HTTPStatusError as err:
        raise HealthCheckFailed(f"{err.request.url.path} answered {err.response.status_code}: "
                                f"{err.response.text[:200]}") from None
    except httpx.HTTPError as err:
        raise HealthCheckFailed(f"request to {client.base_url} failed: {err}") from None
    if not answer_matches(done.text, check.expected):
        raise HealthCheckFailed(f"completion of {check.prompt!r} was {done.text!r}; "
                                f"expected it to contain {check.expected!r}")
    return {"health": status, "models": models, "prompt": check.prompt,
            "completion": done.text, "latency_s": round(done.latency_s, 4)}
