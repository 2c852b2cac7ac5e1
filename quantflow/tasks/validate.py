"""Stage 4: evaluate the quantized model exactly as the baseline was; one verdict."""

from __future__ import annotations

import hashlib
import json
import logging

from prefect import task

from quantflow.storage.artifacts import (baseline_metrics_digest, begin_outputs, fetch_quantized,
                                         finish_outputs, local_checkpoint, read_json_uri, split_uri)
from quantflow.config import CompletionCheck, DeployConfig, ValidationConfig
from quantflow.errors import StageError
from quantflow.evaluation.compare import compare
from quantflow.evaluation.consistency import mean_kl
from quantflow.evaluation.suite import evaluate_model, evaluation_phases, load_logprobs
from quantflow.storage.manifests import CheckpointManifest, QuantizedManifest, ValidationManifest, now
from quantflow.profiling import measure
from quantflow.progress import stage_progress
from quantflow.reports.model_card import CARD, render_card
from quantflow.reports.reporting import render_chart, render_markdown, render_performance_chart
from quantflow.storage.store import ArtifactStore
from quantflow.tasks.policy import stage_task_options
from quantflow.versions import tool_versions

log = logging.getLogger("quantflow.validate")
STAGE = "validate"
REPORT = "validation_report.json"
PERF_CHART = "performance_chart.png"


def summarize(checks: list[dict]) -> str:
    failed = [c for c in checks if c["gating"] and not c["passed"]]
    if not failed:
        return "all checks passed"
    return "; ".join(f"{c['check']}: {c['metric']} {c['baseline']:.4g} -> {c['quantized']:.4g} "
                     f"({c['delta_pct']:+.2f}%, rule {c['rule']})" for c in failed)


def check_baseline_unchanged(baseline_doc: dict, checkpoint: CheckpointManifest) -> None:
    """The baseline numbers the verdict compares against are stage 1's: baseline_metrics.json
    edited after stage 1 (its digest is in the checkpoint manifest) is refused, not used."""
    if checkpoint.baseline_digest and \
            baseline_metrics_digest(baseline_doc.get("metrics", {})) != checkpoint.baseline_digest:
        raise StageError(STAGE, f"{checkpoint.baseline_uri} was modified after stage 1 wrote it: its "
                         "metrics no longer match the digest stage 1 recorded",
                         "delete it and re-run: stage 1 measures the baseline again")


def validate_model(validation: ValidationConfig, checkpoint: CheckpointManifest,
                   quantized: QuantizedManifest, output_uri: str,
                   serving: DeployConfig | None = None) -> ValidationManifest:
    store = ArtifactStore(output_uri)
    begin_outputs(store, STAGE)
    phases = [*evaluation_phases(validation), *(["performance"] if validation.performance.enabled else [])]
    with measure() as usage, stage_progress(STAGE, phases):
        baseline_doc = read_json_uri(checkpoint.baseline_uri)
        check_baseline_unchanged(baseline_doc, checkpoint)
        if baseline_doc["validation_config"] != validation.for_baseline().model_dump(mode="json"):
            raise StageError(STAGE, "the baseline was measured with different validation settings",
                             "re-run the pipeline so stage 1 re-measures the baseline")
        local, _ = fetch_quantized(quantized, STAGE)
        # The quantized model's own greedy answers to the health and probe prompts: a served
        # answer that starts like them shows the serving stack runs the validated model, even
        # where quantization changed the first word the baseline gave (and the gate allowed it).
        prompts = [CompletionCheck(messages=g["messages"], max_tokens=g["max_tokens"]) if g.get("messages")
                   else CompletionCheck(prompt=g["prompt"], max_tokens=g["max_tokens"])
                   for g in checkpoint.golden if g.get("answer") is not None]
        candidate = evaluate_model(local, validation, store, "quantized", STAGE, serving,
                                   trust_remote_code=checkpoint.model.trust_remote_code,
                                   golden_prompts=prompts or None, fidelity=validation.served_fidelity)
        kl = None
        if validation.consistency.enabled and checkpoint.logprobs_uri:
            kl = mean_kl(load_logprobs(checkpoint.logprobs_uri,
                                       baseline_doc["metrics"].get("logprobs", {}).get("sha256")),
                         load_logprobs(candidate["logprobs"]["uri"]))
        checks = compare(baseline_doc["metrics"], candidate, validation, kl)
        performance = None
        if validation.performance.enabled:
            from quantflow.serving.performance import measure_performance

            baseline_dir = local_checkpoint(checkpoint, STAGE)
            performance, perf_checks = measure_performance(
                str(baseline_dir), checkpoint.fingerprint, str(local), serving or DeployConfig(),
                validation.performance)
            checks += perf_checks
        failed = [c["check"] for c in checks if c["gating"] and not c["passed"]]
        report = {
            "model": checkpoint.model.id, "label": quantized.label, "created_at": now(),
            "overall_pass": not failed, "failed_checks": failed, "summary": summarize(checks),
            "checks": checks, "checkpoint_uri": quantized.uri,
            "checkpoint_sha256": quantized.checkpoint_sha256,
            "baseline_fingerprint": checkpoint.fingerprint,
            "size": {"baseline_bytes": quantized.baseline_size_bytes,
                     "quantized_bytes": quantized.size_bytes,
                     "ratio": round(quantized.size_bytes / quantized.baseline_size_bytes, 4)},
            "config": validation.model_dump(mode="json"), "versions": tool_versions(),
            "measured_by": {"baseline": baseline_doc["metrics"].get("loaded_by"),
                            "quantized": candidate.get("loaded_by")},
        }
        if performance is not None:
            report["performance"] = performance
        if candidate.get("served_fidelity"):  # deploy compares the new server with these numbers
            report["served_fidelity"] = {**candidate["served_fidelity"],
                                         "max_delta_pct": validation.served_fidelity.max_delta_pct}
        if quantized.expert_coverage:
            report["expert_coverage"] = {k: v for k, v in quantized.expert_coverage.items() if k != "per_layer"}
        if candidate.get("golden"):
            report["golden"] = [{**g, "source": "quantized"} for g in candidate["golden"]]
        if validation.consistency.enabled:
            report["generations"] = {"prompts": validation.consistency.prompts,
                                     "baseline": baseline_doc["metrics"]["generations"]["texts"],
                                     "quantized": candidate["generations"]["texts"]}
        store.write_bytes("validation_chart.png", render_chart(checks))
        if performance is not None:
            store.write_bytes(PERF_CHART, render_performance_chart(performance))
        store.write_text("validation_report.md", render_markdown(
            report, "validation_chart.png", PERF_CHART if performance is not None else None))
        raw = (json.dumps(report, indent=2, default=str) + "\n").encode()
        uri = store.write_bytes(REPORT, raw)
        card_sha256 = write_model_card(report, quantized, checkpoint, hashlib.sha256(raw).hexdigest(), local)
    verdict = "PASS" if report["overall_pass"] else "FAIL"
    log.info("validate: %s — %s", verdict, report["summary"])
    return finish_outputs(store, STAGE, ValidationManifest(report_uri=uri, report_sha256=hashlib.sha256(raw).hexdigest(),
                              overall_pass=report["overall_pass"],
                              checkpoint_sha256=quantized.checkpoint_sha256, failed_checks=failed,
                              summary=report["summary"], card_sha256=card_sha256,
                              versions=tool_versions(), usage=vars(usage)))


def write_model_card(report: dict, quantized: QuantizedManifest, checkpoint: CheckpointManifest,
                     report_sha256: str, local) -> str:
    """README.md in the quantized checkpoint folder, generated from the report."""
    from quantflow.serving.schemes import scheme_of_checkpoint

    scheme = scheme_of_checkpoint(str(local))
    card = render_card(report, quantized, checkpoint, report_sha256, scheme.label if scheme else None)
    store, name = split_uri(quantized.uri)
    store.write_text(f"{name}/{CARD}", card)
    return hashlib.sha256(card.encode()).hexdigest()


validate_task = task(**stage_task_options(STAGE))(validate_model)
