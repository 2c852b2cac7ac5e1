"""Start a pipeline run through Prefect's REST API, exactly as another service would.

    POST {PREFECT_API_URL}/deployments/name/quantize-pipeline/quantize-pipeline   -> id
    POST {PREFECT_API_URL}/deployments/{id}/create_flow_run
         {"parameters": {"config": {...}}, "idempotency_key": "..."}
With PREFECT_API_AUTH_STRING set, every request carries HTTP Basic auth made from it.
"""

from __future__ import annotations

import base64
import os
import time
from typing import Any

import httpx

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


def auth_headers(auth_string: str | None = None) -> dict[str, str]:
    auth = auth_string if auth_string is not None else os.environ.get("PREFECT_API_AUTH_STRING")
    if not auth:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}


RETRY_STATUS = {502, 503, 504}  # a busy server (SQLite "database is locked" answers 503)


class PrefectREST:
    def __init__(self, api_url: str, auth_string: str | None = None, timeout_s: float = 30,
                 retries: int = 5):
        self.http = httpx.Client(base_url=api_url.rstrip("/") + "/", headers=auth_headers(auth_string),
                                 timeout=timeout_s,
                                 transport=httpx.HTTPTransport(retries=2))  # connection errors
        self.retries = retries
        # What the server answered badly, kept for load tests: "<status> <path>" per 5xx
        # answer (retried or not) and one entry per refused connection.
        self.server_errors: list[str] = []
        self.connection_errors = 0

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One API call, retried with backoff while the server answers 502/503/504 or
        refuses connections (restarting; nothing was sent, so a retry cannot duplicate)."""
        for attempt in range(self.retries + 1):
            try:
                r = self.http.request(method, path, **kwargs)
            except httpx.ConnectError:
                self.connection_errors += 1
                if attempt == self.retries:
                    raise
                time.sleep(min(2 ** attempt * 0.5, 8))
                continue
            if r.status_code >= 500:
                self.server_errors.append(f"{r.status_code} {path}")
            if r.status_code not in RETRY_STATUS or attempt == self.retries:
                return r
            time.sleep(min(2 ** attempt * 0.5, 8))
        raise AssertionError("unreachable")

    def _ok(self, r: httpx.Response) -> Any:
        if r.status_code == 401:
            raise PermissionError("the Prefect API refused the request (401): set PREFECT_API_AUTH_STRING "
                                  "to the server's auth string")
        if r.status_code == 409:
            raise ValueError(f"the Prefect API rejected the parameters: {r.json().get('detail', r.text)}")
        r.raise_for_status()
        return r.json()

    def deployment_id(self, name: str) -> str:
        return self._ok(self.request("GET", f"deployments/name/{name}"))["id"]

    def create_flow_run(self, deployment: str, parameters: dict, idempotency_key: str | None = None,
                        tags: list[str] | None = None) -> dict:
        body: dict[str, Any] = {"parameters": parameters, "tags": tags or []}
        if idempotency_key:
            body["idempotency_key"] = idempotency_key
        return self._ok(self.request("POST", f"deployments/{self.deployment_id(deployment)}/create_flow_run",
                                     json=body))

    def flow_run(self, run_id: str) -> dict:
        return self._ok(self.request("GET", f"flow_runs/{run_id}"))

    def resume(self, run_id: str, run_input: dict) -> dict:
        """Answer a paused or suspended run (e.g. the approval form). An invalid input is
        answered 200 with status REJECT, so the body is checked, not only the code."""
        body = self._ok(self.request("POST", f"flow_runs/{run_id}/resume", json={"run_input": run_input}))
        if body.get("status") != "ACCEPT":
            raise ValueError(f"the server did not accept the input: {body.get('details') or body}")
        return body

    def wait(self, run_id: str, timeout_s: float = 3600, poll_s: float = 2) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            run = self.flow_run(run_id)
            if run["state_type"] in TERMINAL or time.monotonic() > deadline:
                return run
            time.sleep(poll_s)
