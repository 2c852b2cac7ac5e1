"""Optional human approval between a passing validation and deployment, in-process. (On
the platform: a rejection through the REST API, tests/test_platform.py
test_approval_suspends_and_releases_the_worker; an approval that deploys and a rejection,
through the UI's resume form, tests/test_browser.py.)"""

from __future__ import annotations

import contextvars
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import needs_serving
from helpers import stop_deployment
from quantflow.flows.pipeline import quantize_pipeline
from quantflow.serving.registry import DeploymentRegistry

pytestmark = [pytest.mark.slow]


def run_in_thread(fn):
    """Run a flow beside the test, with the test's Prefect settings (contextvars)."""
    box = {}
    ctx = contextvars.copy_context()
    thread = threading.Thread(target=lambda: box.update(state=ctx.run(fn)), daemon=True)
    thread.start()
    return thread, box


def wait_paused(api: str, output_dir: str, timeout_s: float = 300) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = httpx.post(f"{api}/flow_runs/filter", timeout=10, json={
            "flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}}).json()
        for r in runs:
            if r["parameters"]["config"]["output_dir"] == output_dir:
                return r["id"]
        time.sleep(1)
    raise AssertionError("the flow never paused for approval")


def decide(run_id: str, approve: bool, reason: str) -> None:
    from prefect.flow_runs import resume_flow_run

    resume_flow_run(run_id, run_input={"approve": approve, "reason": reason})


@needs_serving
@pytest.mark.serving
def test_a_paused_run_rejected_deploys_nothing(prefect_server, config_factory):
    """An in-process run (`quantflow run`) pauses rather than suspends; a rejection ends it
    ApprovalRejected with the reason and nothing deployed. (Approved, the same decision
    deploys: in the browser, tests/test_browser.py, through a suspended deployment run.)"""
    cfg = config_factory(validation={"require_approval": True,
                                     "perplexity": {"source": {"dataset": ".cache/demo/data/heldout.jsonl"},
                                                    "window": 128}})
    try:
        thread, box = run_in_thread(lambda: quantize_pipeline(config=cfg, return_state=True))
        decide(wait_paused(prefect_server, cfg.output_uri), False, "not this week")
        thread.join(600)
        state = box["state"]
        assert state.name == "ApprovalRejected" and "not this week" in state.message, state
        summary = json.loads((Path(cfg.output_uri) / "pipeline_summary.json").read_text())
        assert summary["approval"] == "not this week" and summary["outcome"] == "approval_rejected"
        assert summary["verdict"] == "pass" and "deploy" not in summary["stages"]
        assert DeploymentRegistry().active(cfg.name) is None
        assert not (Path(cfg.output_uri) / "deployment.json").exists()
    finally:
        stop_deployment(cfg.name)
