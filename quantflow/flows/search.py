"""Autopilot: find the smallest (or fastest) quantized model that passes the gate and that
the deploy target serves, and release it like a normal run.

Candidates the target cannot serve are dropped before any quantization (the deploy
pre-flight's own answer). The baseline, calibration set and baseline log-probs are stage 1
and 2 of the pipeline, computed once and shared; each candidate is the pipeline's cached
quantize + validate in its own folder (candidates/<name>-<digest>/), so a second search, or
one with a candidate more, computes only what is new.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Failed

from quantflow.storage.artifacts import read_json_uri
from quantflow.config.search import Candidate, SearchConfig
from quantflow.errors import StageError
from quantflow.flows.pipeline import (GATE_STATE, Summary, golden_prompts, layer_shape_problem, perplexity_of,
                                      release, run_summarized, serving_inputs)
from quantflow.flows.stages import StageRecord, run_cached_stage
from quantflow.storage.manifests import CalibrationManifest, CheckpointManifest, QuantizedManifest, ValidationManifest
from quantflow.progress import report, stage_progress
from quantflow.quantization.sensitivity import layer_pattern, render_sensitivity_chart
from quantflow.reports.search_report import (pareto_front, quality_loss, render_pareto_chart,
                                             render_search_markdown)
from quantflow.storage.checkpoints import model_config_of
from quantflow.serving.compatibility import cannot_serve, check_scheme
from quantflow.serving.schemes import scheme_for
from quantflow.storage.hashing import digest_of
from quantflow.storage.store import ArtifactStore
from quantflow.tasks.sensitivity import sensitivity_task

log = logging.getLogger("quantflow.search")
REPORT, CHART, SENSITIVITY, SENSITIVITY_CHART = ("search_report.json", "search_pareto.png",
                                                 "sensitivity.json", "sensitivity.png")


def candidate_folder(output_uri: str, candidate: Candidate) -> str:
    """Named for what it holds, so adding or reordering candidates keeps every cache key."""
    return f"{output_uri.rstrip('/')}/candidates/{candidate.name}-{digest_of(candidate.model_dump(mode='json'))[:8]}"


def drop_reason(config: SearchConfig, candidate: Candidate) -> str | None:
    """Why the deploy target cannot serve this candidate (None: it serves, or is not checked)."""
    if not (config.deploy.enabled and config.deploy.backend == "local"):
        return None
    shapes = layer_shape_problem(candidate.quant(), config.model)
    if shapes:  # the pipeline's flow-start check: vLLM's block kernels refuse these layers
        return shapes[0]
    scheme = scheme_for(candidate.quant())
    if scheme is None:
        return None
    answer = check_scheme(scheme, config.deploy, model_config=model_config_of(config.model))
    return None if answer["serves"] else f"{answer['scheme']}, which {cannot_serve(answer)}"


def _scores(report: dict) -> dict[str, Any]:
    checks = {c["check"]: c for c in report["checks"]}
    perf = checks.get("performance:throughput")
    return {"ppl_delta_pct": (perplexity_of(report) or {}).get("delta_pct"),
            "kl": checks["kl_divergence"]["quantized"] if "kl_divergence" in checks else None,
            "throughput_ratio": (perf["quantized"] / perf["baseline"]) if perf and perf["baseline"] else None,
            "size_bytes": report["size"]["quantized_bytes"], "size_ratio": report["size"]["ratio"],
            "failed_checks": report["failed_checks"], "summary": report["summary"]}


# Not cached itself: its quantize and validate stages are, under their own keys.
@task(name="candidate", retries=0, persist_result=False, cache_policy=NO_CACHE)
def evaluate_candidate(name: str, candidate: Candidate, config: SearchConfig, checkpoint: CheckpointManifest,
                       calibration: CalibrationManifest | None, ranking: list[int] | None) -> dict:
    """Quantize + validate one candidate (each a cached stage). A keep-sensitive candidate
    keeps 1, 2, … of the most sensitive decoder layers until it passes."""
    folder = candidate_folder(config.output_uri, candidate)
    base = candidate.quant()
    attempts: list[tuple[str, Any, list[int]]] = [(folder, base, [])]
    if candidate.keep_sensitive:
        most = candidate.max_kept_layers or len(ranking or []) - 1
        attempts = []
        for k in range(1, min(most, len(ranking or [])) + 1):
            kept = sorted((ranking or [])[:k])
            quant = base.model_copy(update={"ignore": [*base.ignore, *map(layer_pattern, kept)]})
            attempts.append((f"{folder}-keep{k}", quant, kept))
    pools, timeout = config.placement.pools, config.placement.stage_timeout_s
    _, validate_serving = serving_inputs(config)
    outcome: dict[str, Any] = {"name": name, "quant": base.model_dump(mode="json", exclude_defaults=True),
                               "keep_sensitive": candidate.keep_sensitive, "attempts": [], "records": []}
    start = time.perf_counter()
    for uri, quant, kept in attempts:
        qman, qrec = run_cached_stage("quantize", output_uri=uri, pool=pools.get("quantize"),
                                      timeout_s=timeout, quant=quant, checkpoint=checkpoint,
                                      calibration=calibration if quant.needs_calibration else None,
                                      min_expert_tokens=config.calibration.min_tokens_per_expert)
        verdict, vrec = run_cached_stage("validate", output_uri=uri, pool=pools.get("validate"),
                                         timeout_s=timeout, validation=config.validation,
                                         checkpoint=checkpoint, quantized=qman, serving=validate_serving)
        scores = _scores(read_json_uri(verdict.report_uri))
        attempt = {"output_uri": uri, "kept_layers": kept, "passed": verdict.overall_pass,
                   "cached": qrec.cache_hit and vrec.cache_hit, **scores}
        outcome["attempts"].append(attempt)
        outcome["records"] += [_named(qrec, name, kept), _named(vrec, name, kept)]
        log.info("search: %s%s %s — %s", name, f" keeping layers {kept}" if kept else "",
                 "PASS" if verdict.overall_pass else "FAIL", verdict.summary)
        outcome.update(quantized=qman.model_dump(mode="json"), validation=verdict.model_dump(mode="json"),
                       report_uri=verdict.report_uri, output_uri=uri, **scores)
        if verdict.overall_pass:
            break
    passed = outcome["attempts"][-1]["passed"] if outcome["attempts"] else False
    outcome["status"] = "passed" if passed else "failed"
    outcome["wall_s"] = round(time.perf_counter() - start, 3)
    if candidate.keep_sensitive:
        outcome["ranking"] = ranking
        if passed:
            outcome["kept_layers"] = outcome["attempts"][-1]["kept_layers"]
        elif not attempts:
            outcome["reason"] = "the model has a single decoder layer: nothing to keep"
        else:
            outcome["reason"] = (f"failed keeping up to {len(attempts[-1][2])} of the most sensitive layers "
                                 f"{attempts[-1][2]}: {outcome['summary']}")
    if not passed and "reason" not in outcome and outcome["attempts"]:
        outcome["reason"] = outcome["summary"]
    return outcome


def _outcome(name: str, candidate: Candidate, status: str, reason: str) -> dict:
    """A candidate that was not evaluated: dropped, not run, or broken."""
    return {"name": name, "status": status, "reason": reason, "keep_sensitive": candidate.keep_sensitive,
            "quant": candidate.quant().model_dump(mode="json", exclude_defaults=True)}


def _named(record: StageRecord, name: str, kept: list[int]) -> dict:
    suffix = f"-keep{len(kept)}" if kept else ""
    return {**record.__dict__, "stage": f"{name}{suffix}:{record.stage}"}


def _run_candidates(config: SearchConfig, todo: list[tuple[str, Candidate]], ckpt, calib,
                    rankings) -> list[dict]:
    """In waves of search.concurrency; a ladder stops after the wave holding its first pass."""
    results: list[dict] = []
    width = config.search.concurrency
    for i in range(0, len(todo), width):
        wave = todo[i:i + width]
        futures = [evaluate_candidate.submit(n, c, config, ckpt, calib, rankings.get(_scheme_key(c)))
                   for n, c in wave]
        for (n, c), fut in zip(wave, futures):
            try:
                results.append(fut.result())
            except Exception as err:  # noqa: BLE001 - one broken candidate does not end the search
                log.error("search: %s failed: %s", n, err)
                results.append(_outcome(n, c, "error", f"{type(err).__name__}: {err}"))
            report("candidates", len(results), len(todo), f"candidate {len(results)} of {len(todo)} evaluated: {n}")
        if config.search.mode == "ladder" and any(r["status"] == "passed" for r in results):
            break
    return results


def _scheme_key(c: Candidate) -> str | None:
    return c.quant().label if c.keep_sensitive else None


def _sensitivities(config: SearchConfig, todo: list[tuple[str, Candidate]], ckpt, calib,
                   summary: Summary, store: ArtifactStore) -> dict[str, list[int]]:
    keep = {}
    for _, c in todo:
        if c.keep_sensitive:
            keep.setdefault(c.quant().label, c.quant())
    if not keep:
        return {}
    docs = []
    for label, quant in keep.items():
        start = time.perf_counter()
        state = sensitivity_task(quant=quant, checkpoint=ckpt,
                                 calibration=calib, samples=config.search.sensitivity_samples,
                                 dtype=config.validation.dtype, output_uri=config.output_uri, return_state=True)
        doc = state.result()
        summary.add(StageRecord(stage=f"sensitivity:{label}", cache_hit=state.name == "Cached",
                                wall_s=round(time.perf_counter() - start, 3),
                                peak_rss_mib=doc.get("usage", {}).get("peak_rss_mib")))
        docs.append({k: v for k, v in doc.items() if k != "usage"})
        log.info("search: layer sensitivity to %s, most sensitive first: %s", label, doc["ranking"])
    store.write_json(SENSITIVITY, {"schemes": docs})
    store.write_bytes(SENSITIVITY_CHART, render_sensitivity_chart(docs))
    return {d["scheme"]: d["ranking"] for d in docs}


def _choose(config: SearchConfig, outcomes: list[dict]) -> dict | None:
    passed = [o for o in outcomes if o["status"] == "passed"]
    if not passed:
        return None
    if config.search.mode == "ladder":
        return passed[0]
    if config.search.objective == "fastest":
        return max(passed, key=lambda o: (o.get("throughput_ratio") or 0.0, -(quality_loss(o) or 0.0)))
    return min(passed, key=lambda o: (o["size_bytes"], quality_loss(o) or 0.0))


@flow(name="quantize-search", log_prints=False, validate_parameters=True)  # see flows/pipeline.py
def quantize_search(config: SearchConfig) -> Any:
    """Try quantization candidates against the gate; deploy the one the search chooses.

    Args:
        config: A pipeline config plus `search`: the candidates to try, ladder or sweep, and
            the objective (configs/demo-search.yaml).
    """
    return run_summarized(config, _search)


def _search(config: SearchConfig, summary: Summary) -> Any:
    store = ArtifactStore(config.output_uri)
    spec = config.search
    outcomes: dict[str, dict] = {}
    todo: list[tuple[str, Candidate]] = []
    for name, c in spec.named():
        reason = drop_reason(config, c)
        if reason:
            log.info("search: dropping %s: %s", name, reason)
            outcomes[name] = _outcome(name, c, "dropped", reason)
        else:
            todo.append((name, c))
    if not todo:
        raise StageError("search", "the deploy target serves none of the candidates: "
                         + "; ".join(f"{n}: {o['reason']}" for n, o in outcomes.items()),
                         "add a candidate `quantflow doctor` lists as served here, or set deploy.enabled: false")

    pools, common = config.placement.pools, {"output_uri": config.output_uri,
                                             "timeout_s": config.placement.stage_timeout_s,
                                             "retry_delays_s": config.placement.retry_delays_s}
    lm_eval_serving, _ = serving_inputs(config)
    ckpt, rec = run_cached_stage("checkpoint", pool=pools.get("checkpoint"), model=config.model,
                                 validation=config.validation.for_baseline(), serving=lm_eval_serving,
                                 golden_prompts=golden_prompts(config), **common)
    summary.add(rec)
    calib = None
    if any(c.quant().needs_calibration or c.keep_sensitive for _, c in todo):
        calib, rec = run_cached_stage("calibration", pool=pools.get("calibration"),
                                      calibration=config.calibration, checkpoint=ckpt, **common)
        summary.add(rec)
    rankings = _sensitivities(config, todo, ckpt, calib, summary, store)

    with stage_progress("search", ["candidates"]):
        results = _run_candidates(config, todo, ckpt, calib, rankings)
    for result in results:
        for r in result.pop("records", []):
            summary.add(StageRecord(**r))
        outcomes[result["name"]] = result
    chosen = _choose(config, list(outcomes.values()))
    ordered = []
    for name, c in spec.named():
        o = outcomes.get(name) or _outcome(name, c, "not_run",
                                           f"the ladder stopped at {chosen['name']}" if chosen else "")
        if chosen and o["name"] == chosen["name"]:
            o["status"] = "chosen"
            o["reason"] = ("first candidate in ladder order to pass" if spec.mode == "ladder" else
                           f"{spec.objective} of the {sum(x['status'] in ('passed', 'chosen') for x in outcomes.values())}"
                           " that passed")
        ordered.append(o)
    report = write_report(config, ordered, summary, store)
    summary.data.update(method=chosen["name"] if chosen else "search", search_report=store.uri(REPORT))
    if chosen is None:
        errors = [o for o in ordered if o["status"] == "error"]
        if errors:
            raise StageError("search", "no candidate passed, and "
                             + "; ".join(f"{o['name']}: {o['reason']}" for o in errors))
        summary.write("rejected", verdict="fail", search=_brief(report))
        return Failed(name=GATE_STATE, message="no candidate passed the quality gate; nothing deployed",
                      data={"report": store.uri(REPORT)})
    ckpt_quant = QuantizedManifest.model_validate(chosen["quantized"])
    verdict = ValidationManifest.model_validate(chosen["validation"])
    full = read_json_uri(verdict.report_uri)
    metrics = {"perplexity": perplexity_of(full), "size": full["size"], "report": verdict.report_uri,
               "search": _brief(report)}
    return release(config, summary, ckpt, ckpt_quant, verdict, full, metrics)


def _brief(report: dict) -> dict:
    return {"chosen": report["chosen"], "mode": report["mode"], "pareto_front": report["pareto_front"],
            "candidates": {o["name"]: o["status"] for o in report["candidates"]}}


def write_report(config: SearchConfig, outcomes: list[dict], summary: Summary,
                 store: ArtifactStore) -> dict:
    evaluated = [o for o in outcomes if o["status"] in ("chosen", "passed", "failed")]
    speed = any(o.get("throughput_ratio") is not None for o in evaluated)
    front = pareto_front(evaluated, use_speed=speed)
    for o in outcomes:
        o["pareto"] = o["name"] in front
    metric = "mean KL divergence (nats)" if any(o.get("kl") is not None for o in evaluated) \
        else "perplexity increase (%)"
    chosen = next((o["name"] for o in outcomes if o["status"] == "chosen"), None)
    report = {"name": config.name, "model": config.model.id, "mode": config.search.mode,
              "objective": config.search.objective, "chosen": chosen, "quality_metric": metric,
              "speed_measured": speed, "pareto_front": front, "candidates": outcomes,
              "stages": {s: r.__dict__ for s, r in summary.stages.items()}}
    chart = None
    if evaluated:
        store.write_bytes(CHART, render_pareto_chart(evaluated, front, metric))
        chart = CHART
    sens = SENSITIVITY_CHART if store.exists(SENSITIVITY_CHART) and any(o.get("keep_sensitive") for o in outcomes) \
        else None
    markdown = render_search_markdown(report, chart, sens)
    store.write_text("search_report.md", markdown)
    store.write_json(REPORT, report)
    create_markdown_artifact(key=f"{config.name}-search", markdown=markdown,
                             description=f"Search: {chosen or 'no candidate passed'}")
    create_table_artifact(key=f"{config.name}-search-candidates",
                          table=[{"candidate": o["name"], "result": o["status"],
                                  "size_mb": round(o["size_bytes"] / 1e6, 3) if o.get("size_bytes") else None,
                                  "ppl_delta_pct": o.get("ppl_delta_pct"), "kl": o.get("kl"),
                                  "pareto": o["pareto"], "why": o.get("reason") or ""} for o in outcomes],
                          description="every candidate: dropped, failed, passed or chosen, and why")
    return report
