"""Optional human approval between a passing validation and deployment."""

from __future__ import annotations

from prefect.context import FlowRunContext
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.input import RunInput

KEY = "quantflow-approval"


class Approval(RunInput):
    approve: bool
    reason: str = ""


def wait_for_approval(summary_markdown: str, timeout_s: int) -> Approval:
    """Suspend (deployment runs: the worker's infrastructure is released while waiting, and
    the flow re-runs from the top on resume, its stages answered from cache) or pause
    (in-process runs) until someone approves or rejects in the Prefect UI."""
    ctx = FlowRunContext.get()
    form = Approval.with_initial_data(description=summary_markdown, approve=False,
                                      reason="")
    if ctx and ctx.flow_run and ctx.flow_run.deployment_id:
        return suspend_flow_run(wait_for_input=form, timeout=timeout_s, key=KEY)
    return pause_flow_run(wait_for_input=form, timeout=timeout_s, poll_interval=2, key=KEY)
