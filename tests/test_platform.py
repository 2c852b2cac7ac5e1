"""The platform on one machine: Prefect server with an auth string, process workers per
pool (two on cpu, one each on gpu-a100 and gpu-h100), deployments from
deployments/prefect.yaml, artifacts and Prefect results on a local S3-API server (moto, as
s3fs's own tests use).

Where PostgreSQL and Redis run (127.0.0.1:5432 and :6379, as on every machine of this
kind), the server runs on them (infra/single-box.env's settings, with a database and Redis
index of the tests' own): every test here is then a test of the production topology.
Without them the same tests run on SQLite, and those that check PostgreSQL or Redis
themselves skip with the reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import REPO, free_port, needs_serving
from quantflow.platform.submit import PrefectREST
from services import moto_server, pg_query, production_services, services_reason

pytestmark = [pytest.mark.slow, pytest.mark.integration]
AUTH = "admin:quantflow-test"
BUCKET = "quantflow-ci"


@pytest.fixture(scope="module")
def s3_env():
    with moto_server() as url:
        yield {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url}


class Webhook:
    """A loopback HTTP endpoint that records what Prefect's notifications POST to it."""

    def __init__(self):
        import http.server
        import threading

        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def webhook():
    hook = Webhook()
    yield hook
    hook.server.shutdown()


@pytest.fixture(scope="module")
def platform(s3_env, webhook, tmp_path_factory):
    """`make up`, isolated: its own state folder, server port, and environment."""
    from quantflow.platform.local import down, up

    saved = dict(os.environ)
    os.environ.update(s3_env)
    os.environ.update({
        "QUANTFLOW_STATE_DIR": str(tmp_path_factory.mktemp("platform-state")),
        "PREFECT_SERVER_API_AUTH_STRING": AUTH, "PREFECT_API_AUTH_STRING": AUTH,
        # No surprise scheduled runs while the test drives the server.
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "QUANTFLOW_RESULTS_URI": f"s3://{BUCKET}/prefect-results",
        "QUANTFLOW_ALERT_WEBHOOK_URL": webhook.url})
    import s3fs

    s3fs.S3FileSystem().mkdir(BUCKET)
    with production_services("quantflow_test"):
        try:
            yield up(port=free_port(), per_pool={"cpu": 2})
        finally:
            down()
            os.environ.clear()
            os.environ.update(saved)


def demo_params(output_dir: str, **extra) -> dict:
    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data.update(name=f"api-{uuid.uuid4().hex[:6]}", output_dir=output_dir)
    data["validation"]["lm_eval"]["enabled"] = False
    data["deploy"]["enabled"] = False
    data.update(extra)
    return data


def test_unauthenticated_calls_are_refused(platform):
    api = platform["api_url"]
    assert httpx.post(f"{api}/flows/filter", json={}, timeout=10).status_code == 401
    assert httpx.post(f"{api}/flows/filter", json={}, timeout=10, auth=tuple(AUTH.split(":"))).status_code == 200
    with pytest.raises(PermissionError, match="PREFECT_API_AUTH_STRING"):
        PrefectREST(api, auth_string="").deployment_id("quantize-pipeline/quantize-pipeline")


# One cheap configuration shared by the concurrency, restart and submit tests (in this
# order): the first computes its stages, the others find them cached.
CHEAP_OUT = f"s3://{BUCKET}/shared/{uuid.uuid4().hex[:8]}"


TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def task_runs(api: PrefectREST, flow_run_ids: list[str], timeout_s: float = 60) -> list[dict]:
    """The task runs of finished flow runs, once the server has recorded their final states:
    Prefect 3 records task-run states from events, a moment after the flow run itself ends."""
    deadline = time.monotonic() + timeout_s
    while True:
        runs = api._ok(api.request("POST", "task_runs/filter", json={
            "flow_runs": {"id": {"any_": flow_run_ids}}, "limit": 200}))
        if all(r["state_type"] in TERMINAL for r in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(1)


def test_identical_runs_compute_each_stage_once(platform):
    """Two identical runs at once, on two workers: each stage is computed by one of them
    (under the stage's lock); the other waits and reports it Cached."""
    api = PrefectREST(platform["api_url"], AUTH)
    params = {"config": demo_params(CHEAP_OUT, name="same-work")}
    runs = [api.create_flow_run("quantize-pipeline/quantize-pipeline", params, idempotency_key=f"same-{i}")
            for i in range(2)]
    finals = [api.wait(r["id"], timeout_s=900) for r in runs]
    assert [f["state_type"] for f in finals] == ["COMPLETED", "COMPLETED"], [f["state"] for f in finals]
    assert len({f["infrastructure_pid"] for f in finals}) == 2  # two flow-run processes
    by_stage: dict[str, list[dict]] = {}
    for tr in task_runs(api, [r["id"] for r in runs]):
        by_stage.setdefault(tr["name"].rsplit("-", 1)[0], []).append(tr)  # "quantize-a1b"
    stages = ("checkpoint", "calibration", "quantize", "validate")
    for stage in stages:
        names = sorted(tr["state_name"] for tr in by_stage[stage])
        assert names == ["Cached", "Completed"], (stage, names)
    # The later run reached at least one stage while the first was computing it: it waited
    # on the lock instead of computing the stage a second time.
    waited = [stage for stage in stages
              if next(t for t in by_stage[stage] if t["state_name"] == "Cached")["start_time"]
              < next(t for t in by_stage[stage] if t["state_name"] == "Completed")["end_time"]]
    assert waited, "the two runs never overlapped on a stage; nothing was proven about the lock"


COMPUTING_STAGES = ("checkpoint", "calibration", "quantize", "validate")


def computing_stage(api: PrefectREST, flow_run_ids: list[str]) -> dict | None:
    """A stage task run of these flow runs that is RUNNING (a cache hit never is)."""
    runs = api._ok(api.request("POST", "task_runs/filter", json={
        "flow_runs": {"id": {"any_": flow_run_ids}}, "task_runs": {"state": {"type": {"any_": ["RUNNING"]}}}}))
    return next((r for r in runs if r["name"].rsplit("-", 1)[0] in COMPUTING_STAGES), None)


def test_no_run_is_lost_or_duplicated_across_a_server_restart(platform):
    """Runs in flight while the Prefect server restarts: a client re-sending the same
    idempotency keys gets the same runs, the workers reconnect, every run completes once.
    The first run writes a folder of its own, so its stages compute: the server stops while
    one of them is running, not between cache hits."""
    from quantflow.platform.local import restart_server

    api = PrefectREST(platform["api_url"], AUTH, retries=8)
    fresh = f"s3://{BUCKET}/restart/{uuid.uuid4().hex[:8]}"
    keys = [f"restart-{uuid.uuid4().hex[:6]}-{i}" for i in range(3)]
    # The first run's folder is its own, so its stages compute; the others share a folder
    # an earlier test filled (cheap cache hits, which keep the test short).
    params = {k: {"config": demo_params(fresh if i == 0 else CHEAP_OUT, name="restart")}
              for i, k in enumerate(keys)}
    ids = {k: api.create_flow_run("quantize-pipeline/quantize-pipeline", params[k], idempotency_key=k)["id"]
           for k in keys}
    deadline = time.monotonic() + 600
    running = None
    while running is None and time.monotonic() < deadline:
        running = computing_stage(api, [ids[keys[0]]])
        time.sleep(0.5)
    assert running is not None, "no run was computing a stage within 600 s: the restart would prove nothing"
    parent = api.flow_run(running["flow_run_id"])
    assert parent["state_type"] == "RUNNING", parent["state"]
    assert restart_server() == platform["api_url"]
    again = {k: api.create_flow_run("quantize-pipeline/quantize-pipeline", params[k], idempotency_key=k)["id"]
             for k in keys}
    assert again == ids
    finals = {k: api.wait(i, timeout_s=900) for k, i in ids.items()}
    assert {k: f["state_type"] for k, f in finals.items()} == {k: "COMPLETED" for k in keys}, \
        {k: f["state"]["message"] for k, f in finals.items()}
    runs = api._ok(api.request("POST", "flow_runs/filter", json={"flows": {"name": {"any_": ["quantize-pipeline"]}}}))
    assert sorted(r["idempotency_key"] for r in runs if r["idempotency_key"] in keys) == sorted(keys)
    # The stage the server stopped under finished in the same task run, which computed it.
    interrupted = next(r for r in task_runs(api, list(ids.values())) if r["id"] == running["id"])
    assert interrupted["state_name"] == "Completed", interrupted["state"]


def read_s3_json(uri: str) -> dict:
    import s3fs

    return json.loads(s3fs.S3FileSystem().cat_file(uri.removeprefix("s3://")))


def stage_runs(api: PrefectREST, parent_run: dict) -> dict[str, str]:
    """stage -> work pool of the stage runs dispatched by one pipeline run (via the API)."""
    runs = api._ok(api.request("POST", "flow_runs/filter", json={
        "deployments": {"name": {"any_": ["gpu-a100", "gpu-h100"]}},
        "flow_runs": {"start_time": {"after_": parent_run["start_time"]}}}))
    return {r["parameters"]["stage"]: r["work_pool_name"] for r in runs
            if r["state_type"] == "COMPLETED" and r["parameters"]["output_uri"] == parent_run["parameters"]["config"]["output_dir"]}


def test_rest_run_dispatches_gpu_stages_and_caches_on_s3(platform):
    import s3fs

    api = PrefectREST(platform["api_url"], AUTH)
    out = f"s3://{BUCKET}/runs/{uuid.uuid4().hex[:8]}"
    params = {"config": demo_params(out, placement={"pools": {"quantize": "gpu-h100", "validate": "gpu-a100"}})}
    run = api.create_flow_run("quantize-pipeline/quantize-pipeline", params, idempotency_key="first")
    again = api.create_flow_run("quantize-pipeline/quantize-pipeline", params, idempotency_key="first")
    assert again["id"] == run["id"]  # idempotent: the same request creates one run
    final = api.wait(run["id"], timeout_s=900)
    assert final["state_type"] == "COMPLETED", final["state"]["message"]
    assert final["work_pool_name"] == "cpu"
    assert stage_runs(api, final) == {"quantize": "gpu-h100", "validate": "gpu-a100"}
    fs = s3fs.S3FileSystem()
    key = out.removeprefix("s3://")
    for f in ("baseline_metrics.json", "calibration_data.pt", "quantized_model/config.json",
              "validation_report.json", "pipeline_summary.json"):
        assert fs.exists(f"{key}/{f}"), f
    assert fs.ls(f"{BUCKET}/prefect-results"), "no Prefect results/cache records on S3"
    first = read_s3_json(f"{out}/pipeline_summary.json")
    assert first["cache_hits"] == [] and first["verdict"] == "pass"
    assert first["stages"]["quantize"]["extra"]["work_pool"] == "gpu-h100"

    second = api.create_flow_run("quantize-pipeline/quantize-pipeline", params, idempotency_key="second")
    final2 = api.wait(second["id"], timeout_s=900)
    assert final2["state_type"] == "COMPLETED", final2["state"]["message"]
    summary = read_s3_json(f"{out}/pipeline_summary.json")
    assert summary["cache_hits"] == ["calibration", "checkpoint", "quantize", "validate"]
    assert summary["stages"]["validate"]["extra"]["work_pool"] == "gpu-a100"


def test_dispatched_stage_past_its_timeout_is_cancelled(platform):
    """placement.stage_timeout_s on a work pool: the pipeline stops waiting, cancels the
    stage's run on the pool (so a GPU is not left busy) and fails naming the setting; the
    summary on S3 names the stage, and nothing after it ran."""
    api = PrefectREST(platform["api_url"], AUTH)
    out = f"s3://{BUCKET}/runs/{uuid.uuid4().hex[:8]}"
    params = {"config": demo_params(out, placement={"pools": {"checkpoint": "gpu-h100"}, "stage_timeout_s": 2})}
    run = api.create_flow_run("quantize-pipeline/quantize-pipeline", params)
    final = api.wait(run["id"], timeout_s=600)
    assert final["state_type"] == "FAILED", final["state"]
    assert "did not finish within placement.stage_timeout_s=2s; it was cancelled" in final["state"]["message"]
    deadline = time.monotonic() + 120
    while True:
        runs = [r for r in api._ok(api.request("POST", "flow_runs/filter", json={
            "deployments": {"name": {"any_": ["gpu-h100"]}}})) if r["parameters"].get("output_uri") == out]
        if runs and all(r["state_type"] == "CANCELLED" for r in runs) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert [(r["parameters"]["stage"], r["state_type"]) for r in runs] == [("checkpoint", "CANCELLED")]
    summary = read_s3_json(f"{out}/pipeline_summary.json")
    assert summary["outcome"] == "failed" and summary["failed_stage"] == "checkpoint"
    assert list(summary["stages"]) == []


def run_log(api: PrefectREST, run_id: str, waiting_for: str, timeout_s: float = 60) -> list[str]:
    """A flow run's log messages as the API serves them. A worker's run process ships its
    last lines a moment after the run's final state, so this waits for one of them."""
    deadline = time.monotonic() + timeout_s
    while True:
        logs = api._ok(api.request("POST", "logs/filter", json={
            "logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200}))
        messages = [line["message"] for line in logs]
        if waiting_for in messages or time.monotonic() > deadline:
            return messages
        time.sleep(1)


def count_pipeline_runs(api: PrefectREST, output_dir: str) -> int:
    runs = api._ok(api.request("POST", "flow_runs/filter", json={"flows": {"name": {"any_": ["quantize-pipeline"]}}}))
    return sum(1 for r in runs if r["parameters"].get("config", {}).get("output_dir") == output_dir)


def test_requantize_runs_only_when_inputs_change(platform, demo_model, tmp_path):
    from safetensors.torch import load_file, save_file

    api = PrefectREST(platform["api_url"], AUTH)
    model = tmp_path / "model"
    shutil.copytree(demo_model, model)
    out = f"s3://{BUCKET}/requant/{uuid.uuid4().hex[:8]}"
    params = {"config": demo_params(out, model={"id": str(model)})}

    def requantize(expected_log: str) -> dict:
        run = api.create_flow_run("requantize/requantize", params)
        final = api.wait(run["id"], timeout_s=900)
        assert final["state_type"] == "COMPLETED", final["state"]["message"]
        assert expected_log in run_log(api, run["id"], expected_log), expected_log  # the UI's Logs tab
        return final

    requantize("requantize: calibration, config, heldout, model, toolchain changed; running the pipeline")
    assert count_pipeline_runs(api, out) == 1
    # Nothing changed: no pipeline run, no quantization, and the log says why.
    requantize("requantize: nothing changed since the last successful run; skipping")
    assert count_pipeline_runs(api, out) == 1
    tensors = load_file(model / "model.safetensors")
    name = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    requantize("requantize: model changed; running the pipeline")  # new weights: it quantizes again
    assert count_pipeline_runs(api, out) == 2
    summary = read_s3_json(f"{out}/pipeline_summary.json")
    assert "quantize" not in summary["cache_hits"] and summary["verdict"] == "pass"


def test_submit_cli_uses_the_rest_api(platform, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(demo_params(CHEAP_OUT, name="cli")))
    env = {**os.environ, "PREFECT_API_URL": platform["api_url"], "PREFECT_API_AUTH_STRING": AUTH}
    proc = subprocess.run([sys.executable, "-m", "quantflow.cli", "submit", "--config", str(cfg),
                           "--idempotency-key", "cli-1", "--wait"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ended Completed" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "quantflow.cli", "submit", "--config", str(cfg)],
                         env={**env, "PREFECT_API_AUTH_STRING": "wrong:secret"}, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "401" in bad.stderr


def test_approval_suspends_and_releases_the_worker(platform, served_quant):
    """With require_approval, a deployment run suspends after a pass: its process exits
    (no infrastructure held while a person decides) and the decision resumes it."""
    api = PrefectREST(platform["api_url"], AUTH)
    params = demo_params(f"s3://{BUCKET}/approval/{uuid.uuid4().hex[:8]}")
    params["deploy"]["enabled"] = True
    params["quant"] = served_quant["quant"]  # deploy is on: a scheme this host serves
    params["validation"]["require_approval"] = True
    run = api.create_flow_run("quantize-pipeline/quantize-pipeline", {"config": params})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        current = api.flow_run(run["id"])
        if current["state_name"] == "Suspended":
            break
        assert current["state_type"] not in ("COMPLETED", "FAILED", "CRASHED"), current["state"]
        time.sleep(1)
    assert current["state_name"] == "Suspended" and current["state_type"] == "PAUSED"
    pid = int(str(current["infrastructure_pid"]).rsplit(":", 1)[-1])
    for _ in range(60):  # the flow-run process exits once the suspension is recorded
        try:
            os.kill(pid, 0)
            time.sleep(0.5)
        except ProcessLookupError:
            break
    else:
        pytest.fail(f"flow-run process {pid} is still running while suspended")
    with pytest.raises(ValueError, match="did not accept"):
        api.resume(run["id"], {"approve": "maybe"})  # not a boolean: refused, run stays suspended
    assert api.resume(run["id"], {"approve": False, "reason": "not this week"})["status"] == "ACCEPT"
    final = api.wait(run["id"], timeout_s=600)
    assert final["state_name"] == "ApprovalRejected", final["state"]
    assert "not this week" in final["state"]["message"]
    summary = read_s3_json(f"{params['output_dir']}/pipeline_summary.json")
    assert summary["outcome"] == "approval_rejected" and summary["verdict"] == "pass"
    assert summary["approval"] == "not this week" and "deploy" not in summary["stages"]


def test_gpu_job_templates_are_accepted_by_the_server(platform):
    """The Kubernetes GPU templates register as work pools (the server checks that every
    placeholder is a declared variable); no cluster is needed to create a pool."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: platform["api_url"]}), \
            get_client(sync_client=True) as client:
        for pool in ("gpu-a100", "gpu-h100"):
            template = json.loads((REPO / "infra/work-pools" / f"kubernetes-{pool}.json").read_text())
            created = client.create_work_pool(WorkPoolCreate(name=f"k8s-{pool}", type="kubernetes",
                                                             base_job_template=template))
            stored = client.read_work_pool(created.name).base_job_template
            assert stored["variables"]["properties"]["gpu_count"]["default"] == 1
            assert stored["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["nodeSelector"] \
                == "{{ node_selector }}"


def test_alert_events_trigger_the_shipped_automations(platform, webhook):
    """infra/automations: a quality-regression and an endpoint-unreachable event each reach
    the notification webhook."""
    from datetime import datetime, timezone

    assert {"quantflow-quality-regression", "quantflow-endpoint-unreachable"} <= set(platform["automations"])
    assert "quantflow-retry-crashed-runs" in platform["automations"]  # installed with or without alerts
    api = PrefectREST(platform["api_url"], AUTH)
    # The events a monitor emits, sent the way any other service can send one.
    for kind, message in (("quality_regression", "mean quality 0.20 < 0.8"),
                          ("endpoint_unreachable", "probe got no answer: ConnectError")):
        event = {"id": str(uuid.uuid4()), "occurred": datetime.now(timezone.utc).isoformat(),
                 "event": f"quantflow.monitor.{kind}",
                 "resource": {"prefect.resource.id": "quantflow.deployment.smoke",
                              "prefect.resource.name": "smoke", "quantflow.quantization": "gptq"},
                 "payload": {"message": message, "severity": "critical"}}
        assert api.request("POST", "events", json=[event]).status_code == 204
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and len(webhook.received) < 2:
        time.sleep(1)
    notes = {n["subject"]: n["body"] for n in webhook.received}
    assert "quantflow: quality regression on smoke" in notes, notes
    assert "0.20 < 0.8" in notes["quantflow: quality regression on smoke"]
    assert notes.get("quantflow: endpoint unreachable for smoke") == "probe got no answer: ConnectError", notes


def test_requantize_runs_never_overlap(platform):
    """deployments/prefect.yaml gives requantize a concurrency limit of 1 with CANCEL_NEW:
    of two runs started together, one runs and the other is cancelled."""
    api = PrefectREST(platform["api_url"], AUTH)
    params = {"config": demo_params(f"s3://{BUCKET}/overlap/{uuid.uuid4().hex[:8]}")}
    runs = [api.create_flow_run("requantize/requantize", params) for _ in range(2)]
    finals = [api.wait(r["id"], timeout_s=900) for r in runs]
    states = sorted(f["state_type"] for f in finals)
    assert states == ["CANCELLED", "COMPLETED"], [(f["state_name"], f["state"]["message"]) for f in finals]
    cancelled = next(f for f in finals if f["state_type"] == "CANCELLED")
    assert "concurrency" in cancelled["state"]["message"].lower()


def test_state_lives_in_postgres_and_messages_in_redis(platform):
    """The server really runs on the production services: its work pools and runs are rows
    in the test's PostgreSQL database, and its event messages pass through Redis."""
    reason = services_reason()
    if reason:
        pytest.skip(f"PostgreSQL + Redis topology not tested here: {reason}")
    import redis

    from services import REDIS_HOST, REDIS_PORT, REDIS_TEST_DB

    assert platform["topology"]["database"] == "postgresql" and platform["topology"]["broker"] == "redis"
    database = platform["topology"]["database_url"].rsplit("/", 1)[-1]
    pools = {r["name"] for r in pg_query("select name from work_pool", database)}
    assert {"cpu", "gpu-a100", "gpu-h100"} <= pools
    api = PrefectREST(platform["api_url"], AUTH)
    via_api = api._ok(api.request("POST", "flow_runs/count", json={}))
    in_db = pg_query("select count(*) as n from flow_run", database)[0]["n"]
    assert in_db == via_api and in_db > 0
    keys = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_TEST_DB).keys("message:messaging-cache:*")
    assert keys, "no Prefect messages passed through Redis"


def second_checkpoint(validated: dict, out) -> dict:
    """Another validated checkpoint of the same scheme (calibration drawn with another
    seed): a revision to roll back from that is not the one rolled back to."""
    from quantflow.tasks.calibration import build_calibration
    from quantflow.tasks.quantize import quantize_model
    from quantflow.tasks.validate import validate_model

    cfg = validated["config"]
    cal = build_calibration(cfg.calibration.model_copy(update={"seed": 7}), validated["checkpoint"], str(out))
    quant = quantize_model(cfg.quant, validated["checkpoint"], cal, str(out))
    verdict = validate_model(cfg.validation, validated["checkpoint"], quant, str(out))
    assert verdict.overall_pass and quant.checkpoint_sha256 != validated["quantized"].checkpoint_sha256
    return {"quantized": quant, "validation": verdict, "out": out}


def since(start: datetime, iso: str) -> float:
    return (datetime.fromisoformat(iso) - start).total_seconds()


def flow_runs_of(api: PrefectREST, deployment: str) -> list[dict]:
    dep = api._ok(api.request("GET", f"deployments/name/{deployment}"))
    return api._ok(api.request("POST", "flow_runs/filter", json={
        "deployments": {"id": {"any_": [dep["id"]]}}, "sort": "EXPECTED_START_TIME_DESC"}))


@needs_serving
@pytest.mark.serving
@pytest.mark.skipif(shutil.which("nginx", path="/usr/sbin:/usr/bin") is None,
                    reason="nginx missing: run `make system-packages` (nginx-light)")
def test_a_critical_alert_rolls_back_a_deployment_with_auto_rollback(platform, validated_served, demo_model,
                                                                     tmp_path):
    """monitor.auto_rollback: after revision 2 is promoted, a destroyed model is swapped in
    on disk under it and its server restarts on those weights (killed with -9 and started
    again from the same spec, as a supervisor would: test only). The next monitoring round,
    run by the quality-monitor deployment on a worker, raises quality_regression; the shipped
    trigger runs the `rollback` deployment, which brings revision 1's checkpoint back at the
    same address, with no manual step. Then the `stop-deployment` deployment stops it, as an
    operator would from the UI."""
    import signal

    from helpers import complete, destroy, stop_deployment
    from quantflow.serving.process import VllmServer, server_of
    from quantflow.serving.proxy import UPSTREAM_HEADER
    from quantflow.serving.registry import DeploymentRegistry
    from quantflow.tasks.deploy import deploy_model

    v = validated_served
    other = second_checkpoint(v, tmp_path / "second")
    name = "auto"
    deploy = v["config"].deploy.model_copy(update={"port": free_port(), "proxy": "nginx"})
    monitor = v["config"].monitor.model_copy(update={"auto_rollback": True})
    api = PrefectREST(platform["api_url"], AUTH)
    restarted = None
    try:
        # deployment.json of its own: the session's live deployment owns v["out"]'s.
        first = deploy_model(deploy, v["quantized"], v["validation"], str(tmp_path / "first"), name,
                             monitor=monitor, golden=v["checkpoint"].golden)
        second = deploy_model(deploy, other["quantized"], other["validation"], str(other["out"]), name,
                              monitor=monitor, golden=v["checkpoint"].golden)
        assert (first["revision"], second["revision"]) == (1, 2) and second["base_url"] == first["base_url"]
        assert complete(second["base_url"], second["served_model_name"], "evaluated when the", 4)
        model_dir = Path(second["model_dir"])
        assert model_dir.is_relative_to(tmp_path)  # revision 2's own folder, not the session's checkpoint
        shutil.rmtree(model_dir)
        destroy(demo_model, model_dir)
        os.killpg(os.getpgid(second["pid"]), signal.SIGKILL)
        restarted = VllmServer(server_of(second).spec).start(api_key=None)
        restarted.wait_healthy(300)
        # The scheduled monitor's round, run now, on a worker as the platform runs it.
        probe = api.create_flow_run("quality-monitor/quality-monitor", {"deployment": name, "start_exporter": False})
        assert api.wait(probe["id"], timeout_s=300)["state_type"] == "COMPLETED"
        deadline = time.monotonic() + 300  # measured: completed 28 s after the round (docs/serving.md)
        runs: list[dict] = []
        while time.monotonic() < deadline:
            runs = flow_runs_of(api, "rollback/rollback")
            if runs and runs[0]["state_type"] in ("COMPLETED", "FAILED", "CRASHED"):
                break
            time.sleep(2)
        assert runs and runs[0]["state_type"] == "COMPLETED", runs[:1] and runs[0]["state"]
        assert runs[0]["parameters"]["name"] == name
        round_end = datetime.fromisoformat(api.flow_run(probe["id"])["end_time"])
        print(f"\nauto-rollback: the rollback run was created {since(round_end, runs[0]['created']):.1f}s after "
              f"the monitoring round ended and completed {since(round_end, runs[0]['end_time']):.1f}s after it")
        live = DeploymentRegistry().active(name)
        assert (live["revision"], live["model_dir"], live["base_url"]) == (3, first["model_dir"], first["base_url"])
        assert live["rollback"]["to_revision"] == 1 and live["rollback"]["from_revision"] == 2
        assert live["rollback"]["reason"].startswith("automatic: quantflow.monitor.quality_regression: mean quality"), live
        r = httpx.post(f"{live['base_url']}/v1/completions", timeout=60, json={
            "model": live["served_model_name"], "prompt": "evaluated when the", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.headers[UPSTREAM_HEADER] == live["upstream_url"].removeprefix("http://")
        assert complete(live["base_url"], live["served_model_name"], "evaluated when the", 4)

        stop = api.create_flow_run("stop-deployment/stop-deployment", {"name": name})
        assert api.wait(stop["id"], timeout_s=300)["state_type"] == "COMPLETED"
        assert DeploymentRegistry().active(name) is None
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{live['base_url']}/health", timeout=5)
    finally:
        if restarted is not None:
            restarted.stop()
        stop_deployment(name)
