"""The shadow comparison of a canary step: real requests, answered by both models.

nginx mirrors a share of the requests it serves (serving/proxy.py, `render_shadow`) to a
small HTTP listener here. The listener answers nginx at once (204: the copy's answer is
discarded, the client only gets the primary's) and queues the request. One worker sends
it, greedy and one token long, to the live server and to the canary directly and records
whether the first tokens agree. The comparison is bounded: at most `max_per_step` requests
a step, one at a time, and copies arriving while it is busy are dropped and counted.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

log = logging.getLogger("quantflow.deploy")
PATHS = {"/v1/completions", "/v1/chat/completions"}
# What a request may carry that the comparison replaces or cannot use: sampling, streaming,
# several choices, tools that would change the answer's shape.
DROPPED = ("stream", "stream_options", "n", "best_of", "seed", "temperature", "top_p", "top_k",
           "min_p", "logprobs", "top_logprobs", "echo", "max_completion_tokens", "stop",
           "response_format", "tools", "tool_choice")


def greedy_first_token(body: dict[str, Any], model: str) -> dict[str, Any]:
    """The request as the comparison sends it: same prompt or turns, greedy, one token."""
    request = {k: v for k, v in body.items() if k not in DROPPED}
    request.update(model=model, max_tokens=1, temperature=0)
    return request


def answer_text(path: str, answer: dict[str, Any]) -> str:
    choice = answer["choices"][0]
    return choice["text"] if path == "/v1/completions" else (choice["message"].get("content") or "")


class ShadowComparer:
    def __init__(self, live_url: str, canary_url: str, model: str, api_key: str | None,
                 timeout_s: float, max_per_step: int):
        self.urls = {"live": live_url, "canary": canary_url}
        self.model, self.max_per_step = model, max_per_step
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(timeout=timeout_s, headers=headers)
        self.queue: queue.Queue[tuple[str, dict]] = queue.Queue(maxsize=2)
        self.lock = threading.Lock()
        self.stats = self._fresh()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._threads = [threading.Thread(target=self.server.serve_forever, daemon=True),
                         threading.Thread(target=self._work, daemon=True)]

    @staticmethod
    def _fresh() -> dict[str, Any]:
        return {"mirrored": 0, "compared": 0, "agreed": 0, "dropped": 0, "errors": 0, "disagreements": []}

    def start(self) -> "ShadowComparer":
        for t in self._threads:
            t.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        with self.lock:
            while not self.queue.empty():  # nothing queued is judged any more
                self.queue.get_nowait()
            self.queue.put_nowait(("", {}))  # wakes the worker to exit
        # The comparison in flight finishes (each side bounded by the client's timeout)
        # before its client closes under it.
        self._threads[1].join(timeout=2 * self.http.timeout.read + 5 if self.http.timeout.read else 30)
        self.http.close()

    def next_step(self) -> dict[str, Any]:
        """This step's counts so far; the next step counts from zero."""
        with self.lock:
            stats, self.stats = self.stats, self._fresh()
        while not self.queue.empty():  # copies queued in one step are not judged in the next
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        return stats

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {**self.stats, "disagreements": list(self.stats["disagreements"])}

    def offer(self, path: str, body: dict) -> None:
        with self.lock:
            self.stats["mirrored"] += 1
            taken = self.stats["compared"] + self.stats["errors"] + self.queue.qsize()
            if path not in PATHS or taken >= self.max_per_step:
                self.stats["dropped"] += 1
                return
            try:
                self.queue.put_nowait((path, body))
            except queue.Full:
                self.stats["dropped"] += 1

    def _work(self) -> None:
        while True:
            path, body = self.queue.get()
            if not path:
                return
            try:
                answers = {side: answer_text(path, self._ask(url, path, body)) for side, url in self.urls.items()}
            except (httpx.HTTPError, ValueError, KeyError, IndexError) as err:
                with self.lock:
                    self.stats["errors"] += 1
                log.debug("shadow comparison failed: %r", err)
                continue
            with self.lock:
                self.stats["compared"] += 1
                if answers["live"] == answers["canary"]:
                    self.stats["agreed"] += 1
                elif len(self.stats["disagreements"]) < 5:
                    prompt = body.get("prompt") or (body.get("messages") or [{}])[-1].get("content", "")
                    self.stats["disagreements"].append({"prompt": str(prompt)[:80], **answers})

    def _ask(self, base_url: str, path: str, body: dict) -> dict:
        r = self.http.post(base_url + path, json=greedy_first_token(body, self.model))
        r.raise_for_status()
        return r.json()

    def _handler(self):
        comparer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                self.send_response(204)
                self.end_headers()
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                if isinstance(body, dict):
                    comparer.offer(self.path.split("?", 1)[0], body)

            def log_message(self, *args: Any) -> None:  # nginx's copies are not worth a line each
                pass

        return Handler
