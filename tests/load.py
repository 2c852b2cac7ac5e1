"""Bounded clients on loopback: completions sent back to back while a rollout, a rollback or a
canary runs, each request's outcome and the server that answered it recorded."""

from __future__ import annotations

import threading
import time

import httpx

from quantflow.serving.proxy import UPSTREAM_HEADER

CLIENTS = 4
MAX_REQUESTS = 2000  # per client: the stream is bounded whatever happens


class Client(threading.Thread):
    """One keep-alive client (like an SDK's httpx.Client) sending completions back to back."""

    def __init__(self, base_url: str, model: str, stop: threading.Event, key: str,
                 prompts: list[str] | None = None):
        super().__init__(daemon=True)
        self.base_url, self.model, self.stop, self.key = base_url, model, stop, key
        self.prompts = prompts or ["evaluated when the"]
        self.results: list[dict] = []  # start, end, status or error, upstream

    def run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=120,
                          headers={"Authorization": f"Bearer {self.key}"}) as http:
            while not self.stop.is_set() and len(self.results) < MAX_REQUESTS:
                start = time.monotonic()
                try:
                    r = http.post("/v1/completions", json={
                        "model": self.model, "max_tokens": 4,
                        "prompt": self.prompts[len(self.results) % len(self.prompts)],
                        "temperature": 0})
                    ok = r.status_code == 200 and r.json()["choices"][0]["text"] is not None
                    outcome = {"status": r.status_code, "ok": ok,
                               "upstream": r.headers.get(UPSTREAM_HEADER)}
                except (httpx.HTTPError, ValueError, KeyError) as err:
                    outcome = {"status": None, "ok": False, "error": repr(err), "upstream": None}
                self.results.append({"start": start, "end": time.monotonic(), **outcome})


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)


def under_load(base_url: str, model: str, action, what: str, key: str, prompts: list[str] | None = None):
    """Run `action()` while CLIENTS keep-alive clients send completions to base_url: some
    requests before it, and three from each client after it returned. Returns (action's
    result, every request sorted by start, action's start, action's end)."""
    stop = threading.Event()
    prompts = prompts or ["evaluated when the"]
    # Each client starts at another place in the prompts, so a window of requests covers them.
    turns = [prompts[k:] + prompts[:k] for k in range(0, len(prompts), max(1, len(prompts) // CLIENTS))]
    clients = [Client(base_url, model, stop, key, turns[i % len(turns)]) for i in range(CLIENTS)]
    for c in clients:
        c.start()
    try:
        wait_for(lambda: all(len(c.results) >= 2 for c in clients), 120, f"requests before the {what}")
        start = time.monotonic()
        result = action()
        end = time.monotonic()
        wait_for(lambda: all(sum(r["start"] > end for r in c.results) >= 3 for c in clients),
                 120, f"requests after the {what}")
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=150)
    assert not any(c.is_alive() for c in clients)
    return result, sorted((r for c in clients for r in c.results), key=lambda r: r["start"]), start, end


