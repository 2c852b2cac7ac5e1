"""The quantization pipeline: checkpoint -> calibration -> quantize -> validate -> (gate) ->
deploy -> monitor. The validation verdict decides, in this flow, whether deploy runs."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from dataclasses import asdict
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Completed, Failed

from quantflow.storage.artifacts import read_json_uri
from quantflow.config import CompletionCheck, ModelSpec, PipelineConfig, QuantConfig
from quantflow.storage.folder_claims import claim_output
from quantflow.errors import DiskFullError, StageError
from quantflow.flows.approval import wait_for_approval
from quantflow.flows.stages import StageRecord, run_cached_stage
from quantflow.reports.reporting import checks_table, render_markdown
from quantflow.storage.checkpoints import model_config_of
from quantflow.quantization.group_size import block_problem
from quantflow.serving.compatibility import ensure_servable
from quantflow.serving.schemes import scheme_for
from quantflow.storage.store import ArtifactStore
from quantflow.tasks.deploy import CANARY_STATE, CanaryRolledBack, deploy_task
from quantflow.tasks.monitor import monitor_task
from quantflow.profiling import measure

log = logging.getLogger("quantflow.pipeline")
GATE_STATE = "QualityGateFailed"  # also in quantflow.cli and infra/automations
REJECTED_STATE = "ApprovalRejected"


class Summary:
    """pipeline_summary.json: per-stage wall time, peak memory, cache hits, attempts (1 +
    transient-fault retries; a cache hit is 1), the outcome. A failed run lists the stages
    run so far and the failing one (state "Failed")."""

    def __init__(self, config: PipelineConfig):
        self.config = config
        self.store = ArtifactStore(config.output_uri)
        self.started = time.perf_counter()
        self.stages: dict[str, StageRecord] = {}
        self.data: dict[str, Any] = {"name": config.name, "model": config.model.id,
                                     "method": config.quant.label, "output_uri": config.output_uri}

    def add(self, record: StageRecord) -> None:
        self.stages[record.stage] = record

    def write(self, outcome: str, **extra: Any) -> dict[str, Any]:
        total = time.perf_counter() - self.started
        deploy_s = sum(r.wall_s for s, r in self.stages.items() if s in ("deploy", "monitor"))
        doc = {**self.data, **extra, "outcome": outcome,
               "stages": {s: asdict(r) for s, r in self.stages.items()},
               "cache_hits": sorted(s for s, r in self.stages.items() if r.cache_hit),
               "total_wall_s": round(total, 3), "wall_s_excluding_deploy": round(total - deploy_s, 3)}
        self.store.write_json("pipeline_summary.json", doc)
        return doc

    def failed(self, err: BaseException) -> dict[str, Any]:
        record = getattr(err, "stage_record", None)  # the failing stage's record, with its attempts
        if record is not None:
            self.add(record)
        try:
            return self.write("failed", failed_stage=getattr(err, "stage", None) or getattr(record, "stage", None),
                              error=str(err))
        except DiskFullError:  # the summary is a courtesy; the stage's own error says why
            log.warning("could not write pipeline_summary.json: the disk is full")
            return {}


def run_summarized(config: Any, body) -> Any:
    """Run a flow's body holding its output folder, with pipeline_summary.json written on a
    failure too (the pipeline and the search flow share this)."""
    with claim_output(config, config.output_uri):  # before anything is written there
        summary = Summary(config)
        try:
            return body(config, summary)
        except Exception as err:
            summary.failed(err)
            raise


def publish_report(config: PipelineConfig, report: dict) -> None:
    key = f"{config.name}-validation"
    create_markdown_artifact(key=key, markdown=render_markdown(report, None),
                             description=f"Validation of {report['label']}: "
                             f"{'PASS' if report['overall_pass'] else 'FAIL'}")
    create_table_artifact(key=f"{key}-checks", table=checks_table(report["checks"]),
                          description="baseline vs quantized, per check")


def publish_rollout(config: PipelineConfig, steps: list[dict], outcome: str) -> None:
    """The canary's analysis, a row per step, as the run's table artifact."""
    rows = []
    for step in steps:
        mirrored = step.get("mirrored") or {}
        canary, live = step.get("canary") or {}, step.get("live") or {}
        rows.append({"step": f"{step['percent']}%", "held_s": step.get("held_s"),
                     "canary answered": canary.get("answered"), "canary failed": canary.get("errors"),
                     "live answered": live.get("answered"), "canary p99 s": canary.get("p99_s"),
                     "live p99 s": live.get("p99_s"), "p99 limit s": step.get("latency_limit_s"),
                     "mirrored compared": mirrored.get("compared"), "agreement": mirrored.get("agreement"),
                     "verdict": step.get("reason")})
    create_table_artifact(key=re.sub(r"[^a-z0-9-]+", "-", f"{config.name}-canary".lower()), table=rows,
                          description=f"Canary of {config.quant.label}: {outcome}")


def _timed(stage: str, fn, **kwargs) -> tuple[Any, StageRecord]:
    with measure() as usage:
        result = fn(**kwargs)
    return result, StageRecord(stage=stage, wall_s=usage.wall_s, peak_rss_mib=usage.peak_rss_mib)


# log_prints off: it turns every print into a Prefect log line, including those dill
# redirects to capture its own dis.dis() output while `datasets` fingerprints a calibration
# set (a bytecode listing in the run log). quantflow reports through logging.
@flow(name="quantize-pipeline", log_prints=False, validate_parameters=True)
def quantize_pipeline(config: PipelineConfig) -> Any:
    """Quantize a checkpoint, validate it against its baseline and deploy it only if it passes.

    Args:
        config: The whole run, one section per stage (the fields of configs/*.yaml): the
            checkpoint, calibration data, quantization scheme, quality gate, deployment and
            monitoring.
    """
    return run_summarized(config, _pipeline)


def golden_prompts(config: PipelineConfig) -> list[CompletionCheck]:
    """Health-check and probe prompts with no curated answer: stage 1 records the baseline's
    answers to them. Independent of deploy.enabled, so turning deploy on reuses the cache."""
    checks = [config.deploy.health, *config.monitor.probes]
    unique = {(c.key, c.max_tokens): c for c in checks if c.expected is None}
    return list(unique.values())


def layer_shape_problem(quant: QuantConfig, model: ModelSpec) -> tuple[str, str] | None:
    """(why, fix) when vLLM's kernels will refuse the local checkpoint's layer shapes for this
    scheme (FP8 block sizes); None for hub ids, which are checked at quantize."""
    local = Path(model.id).expanduser()
    return block_problem(quant, local if local.is_dir() else None)


def check_servable_early(config: PipelineConfig) -> None:
    """Refuse a scheme the deploy target cannot serve before hours of quantize + validate.
    A recipe's or someone else's scheme is known only from the checkpoint: checked at deploy."""
    if not (config.deploy.enabled and config.deploy.backend == "local"):
        return
    problem = layer_shape_problem(config.quant, config.model)
    if problem:
        raise StageError("deploy", f"quant.fp8_scheme: {problem[0]}", problem[1])
    scheme = scheme_for(config.quant)
    if scheme is not None:
        ensure_servable(scheme, config.deploy, "deploy", f"quant ({config.quant.label})",
                        model_config=model_config_of(config.model))


def serving_inputs(config: PipelineConfig) -> tuple[Any, Any]:
    """The deploy target stages 1 and 4 serve on: lm-eval's local-completions backend needs
    a server; validate also serves when it measures serving performance on the target."""
    lm_eval_serving = (config.deploy if config.validation.lm_eval.enabled
                       and config.validation.lm_eval.backend == "local-completions" else None)
    validate_serving = config.deploy if config.validation.performance.enabled else lm_eval_serving
    return lm_eval_serving, validate_serving


def _pipeline(config: PipelineConfig, summary: Summary) -> Any:
    check_servable_early(config)
    out = config.output_uri
    pools = config.placement.pools
    lm_eval_serving, validate_serving = serving_inputs(config)
    common = {"output_uri": out, "timeout_s": config.placement.stage_timeout_s,
              "retry_delays_s": config.placement.retry_delays_s}

    ckpt, rec = run_cached_stage("checkpoint", pool=pools.get("checkpoint"), model=config.model,
                                 validation=config.validation.for_baseline(), serving=lm_eval_serving,
                                 golden_prompts=golden_prompts(config), **common)
    summary.add(rec)
    calib = None
    if config.quant.needs_calibration:
        calib, rec = run_cached_stage("calibration", pool=pools.get("calibration"),
                                      calibration=config.calibration, checkpoint=ckpt, **common)
        summary.add(rec)
    quant, rec = run_cached_stage("quantize", pool=pools.get("quantize"), quant=config.quant,
                                  checkpoint=ckpt, calibration=calib,
                                  min_expert_tokens=config.calibration.min_tokens_per_expert, **common)
    summary.add(rec)
    verdict, rec = run_cached_stage("validate", pool=pools.get("validate"),
                                    validation=config.validation, checkpoint=ckpt, quantized=quant,
                                    serving=validate_serving, **common)
    summary.add(rec)
    report = read_json_uri(verdict.report_uri)
    publish_report(config, report)
    metrics = {"perplexity": perplexity_of(report), "size": report["size"],
               "report": verdict.report_uri}

    if not verdict.overall_pass:
        summary.write("rejected", verdict="fail", **metrics)
        return Failed(name=GATE_STATE, message=f"quality gate rejected {quant.label}: {verdict.summary}",
                      data={"report": verdict.report_uri, "failed_checks": verdict.failed_checks})
    return release(config, summary, ckpt, quant, verdict, report, metrics)


def release(config: PipelineConfig, summary: Summary, ckpt: Any, quant: Any, verdict: Any,
            report: dict, metrics: dict[str, Any]) -> Any:
    """After a passing verdict: approval (if required), deploy, first monitoring round.
    Shared by the pipeline and the search flow, so a searched model is released the same way."""
    if config.validation.require_approval and config.deploy.enabled:
        decision = wait_for_approval(render_markdown(report, None), config.validation.approval_timeout_s)
        if not decision.approve:
            summary.write("approval_rejected", verdict="pass", approval=decision.reason, **metrics)
            return Failed(name=REJECTED_STATE, message=f"deployment rejected by reviewer: {decision.reason}")
        metrics["approval"] = decision.reason
    if not config.deploy.enabled:
        result = summary.write("validated", verdict="pass", **metrics)
        return Completed(message=f"{quant.label} passed validation (deploy disabled)", data=result)

    try:
        deployment, rec = _timed("deploy", deploy_task, deploy=config.deploy, quantized=quant,
                                 validation=verdict, output_uri=config.output_uri, name=config.name,
                                 monitor=config.monitor, golden=ckpt.golden)
    except CanaryRolledBack as err:
        publish_rollout(config, err.analysis["steps"], f"rolled back: {err.analysis['reason']}")
        summary.write("canary_rolled_back", verdict="pass", canary=err.analysis, **metrics)
        return Failed(name=CANARY_STATE, message=err.cause, data={"deployment": err.analysis})
    summary.add(rec)
    if deployment.get("rollout", {}).get("steps"):
        publish_rollout(config, deployment["rollout"]["steps"], "promoted: every step passed")
    extra: dict[str, Any] = {"endpoint": deployment.get("base_url"),
                             "served_model_name": deployment.get("served_model_name"),
                             "health": deployment.get("health")}
    if config.monitor.enabled and config.deploy.backend == "local":
        mon, rec = _timed("monitor", monitor_task, monitor=config.monitor, deployment=deployment)
        summary.add(rec)
        extra.update(metrics_url=mon["metrics_url"], quality_score=mon["quality_score"])
    result = summary.write("deployed", verdict="pass", **metrics, **extra)
    return Completed(message=f"{quant.label} deployed at {extra['endpoint']}", data=result)

def perplexity_of(report: dict) -> dict | None:
    for c in report["checks"]:
        if c["check"] == "perplexity":
            return {"baseline": c["baseline"], "quantized": c["quantized"], "delta_pct": c["delta_pct"]}
    return None
