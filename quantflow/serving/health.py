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

    def _generate(self, route: str, payload: dict, text_of) -> Completion:
        start = time.perf_counter()
        r = self.http.post(route, json={"model": self.model, **payload, "temperature": 0})
        latency = time.perf_counter() - start
        r.raise_for_status()
        body = r.json()
        usage = body.get("usage") or {}
        return Completion(text=text_of(body["choices"][0]) or "", latency_s=latency,
                          completion_tokens=int(usage.get("completion_tokens", 0)),
                          prompt_tokens=int(usage.get("prompt_tokens", 0)))

    def complete(self, prompt: str, max_tokens: int) -> Completion:
        return self._generate("/v1/completions", {"prompt": prompt, "max_tokens": max_tokens},
                              lambda choice: choice["text"])

    def chat(self, messages: list[dict], max_tokens: int) -> Completion:
        return self._generate("/v1/chat/completions", {"messages": messages, "max_tokens": max_tokens},
                              lambda choice: choice["message"]["content"])

    def ask(self, check: CompletionCheck) -> Completion:
        """A completion check's request: chat turns to /v1/chat/completions, a prompt to
        /v1/completions; greedy either way."""
        messages = check.chat()
        if messages is not None:
            return self.chat(messages, check.max_tokens)
        return self.complete(check.prompt or "", check.max_tokens)


def first_word(text: str) -> str:
    words = text.split()
    return words[0].lower() if words else ""


def answer_matches(text: str, expected: str | None, golden: str | list[str] | None = None) -> bool:
    """A curated `expected` text must appear in the answer. Otherwise the answer must start
    like a recorded greedy answer (`golden`): the baseline's, or the validated quantized
    model's own; same first word. The first word, not the whole text: a sound quantized
    model may drift a few tokens later, a broken one does not get the first word right."""
    if expected is not None:
        return expected.lower() in text.lower()
    references = [golden] if isinstance(golden, str) else list(golden or [])
    words = {first_word(g) for g in references} - {""}
    if words:
        return first_word(text) in words
    return bool(text.strip())


def golden_answers(golden: list[dict] | None, check: CompletionCheck) -> list[str]:
    """Every recorded answer for this prompt and length: the baseline's (stage 1) first,
    then the quantized model's as validation generated it, when recorded."""
    return [g["answer"] for g in golden or []
            if g.get("prompt") == check.key and g.get("max_tokens") == check.max_tokens
            and g.get("answer") is not None]


def golden_answer(golden: list[dict] | None, check: CompletionCheck) -> str | None:
    """The baseline's answer recorded for this prompt and length, if there is one."""
    answers = golden_answers(golden, check)
    return answers[0] if answers else None


def expectation(check: CompletionCheck, golden: list[dict] | None) -> str:
    if check.expected is not None:
        return f"expected it to contain {check.expected!r}"
    answers = golden_answers(golden, check)
    if answers:
        words = " or ".join(f"{first_word(a)!r} ({a!r})" for a in answers)
        return f"expected it to start with the first word of a recorded answer: {words}"
    return "expected a non-empty answer (no golden answer recorded for this prompt)"


def check_endpoint(client: CompletionsClient, check: CompletionCheck,
                   golden: list[dict] | None = None) -> dict:
    """/health, then /v1/models, then a real completion with the expected answer."""
    try:
        status = client.health()
        if status != 200:
            raise HealthCheckFailed(f"/health answered {status}")
        models = client.models()
        if client.model not in models:
            raise HealthCheckFailed(f"/v1/models lists {models}, not {client.model!r}")
        done = client.ask(check)
    except httpx.HTTPStatusError as err:
        raise HealthCheckFailed(f"{err.request.url.path} answered {err.response.status_code}: "
                                f"{err.response.text[:200]}") from None
    except httpx.HTTPError as err:
        raise HealthCheckFailed(f"request to {client.base_url} failed: {err}") from None
    references = golden_answers(golden, check)
    reference = references[0] if references else None
    if not answer_matches(done.text, check.expected, references):
        raise HealthCheckFailed(f"completion of {check.label} was {done.text!r}; "
                                f"{expectation(check, golden)}")
    return {"health": status, "models": models, "prompt": check.key,
            "completion": done.text, "expected": check.expected, "golden": reference,
            "latency_s": round(done.latency_s, 4)}
