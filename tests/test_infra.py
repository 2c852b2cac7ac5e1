"""What cannot run here (clusters, Grafana) is validated statically; the Prometheus rules by
promtool (the live scrape of every metric they use is in test_monitor.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from prometheus_server import (RULE_TESTS, RULES, SCRAPE_CONFIG, alert_rules, dashboard_exprs, needs_promtool,
                               promtool, selectors)
from quantflow.config import DeployConfig
from quantflow.storage.manifests import QuantizedManifest
from quantflow.serving.kubernetes import render

REPO = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.31.0"


def quantized() -> QuantizedManifest:
    return QuantizedManifest(uri="s3://models/x/quantized_model", files={"model.safetensors": "a" * 64},
                             label="gptq-w4a16-g128", method="gptq", entry_point="oneshot", recipe="",
                             quantization_format="pack-quantized", size_bytes=1, baseline_size_bytes=4)


@pytest.mark.parametrize("overrides", [
    {"kubernetes": {"model_subpath": "llama-3.1-8b-gptq"}},
    {"tensor_parallel_size": 2, "max_model_len": 8192, "max_num_seqs": 64, "enable_chunked_prefill": True,
     "kubernetes": {"gpus": 2, "gpu_product": "NVIDIA-A100-SXM4-80GB", "api_key_secret": "vllm-key",
                    "node_selector": {"pool": "inference"}, "service_type": "LoadBalancer",
                    "model_subpath": "llama-3.1-8b-gptq"}},
])
def test_rendered_manifests_are_valid_kubernetes(overrides):
    cfg = DeployConfig.model_validate({"backend": "kubernetes", **overrides})
    deployment, service = render(cfg, quantized(), "Llama 3.1 8B / gptq")
    for doc in (deployment, service):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    pod = deployment["spec"]["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == str(max(cfg.kubernetes.gpus, cfg.tensor_parallel_size))
    assert pod["nodeSelector"]["nvidia.com/gpu.product"] == cfg.kubernetes.gpu_product
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert deployment["metadata"]["name"] == "llama-3-1-8b---gptq"
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_invalid_manifest_is_caught_by_the_schema_check():
    """The schema check itself can fail: a manifest with a misspelt field is rejected."""
    cfg = DeployConfig.model_validate({"backend": "kubernetes", "kubernetes": {"model_subpath": "m"}})
    deployment, _ = render(cfg, quantized(), "x")
    deployment["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_kubernetes_config_refuses_incomplete_or_open_targets():
    with pytest.raises(ValueError, match="model_subpath is required"):
        DeployConfig.model_validate({"backend": "kubernetes"})
    with pytest.raises(ValueError, match="without an API key"):
        DeployConfig.model_validate({"backend": "kubernetes", "kubernetes": {
            "model_subpath": "m", "service_type": "LoadBalancer"}})


@needs_promtool
def test_prometheus_rules_and_scrape_config_pass_promtool():
    rules = alert_rules()
    assert len(rules) >= 5
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical") and r["annotations"]["summary"]
        assert selectors(r["expr"]), r["alert"]  # which series they must be is checked on a live scrape
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0 and f"{len(rules)} rules found" in checked.stdout, checked.stdout + checked.stderr
    checked = promtool("check", "config", str(SCRAPE_CONFIG))
    assert checked.returncode == 0, checked.stdout + checked.stderr


@needs_promtool
def test_every_alert_has_unit_tests_that_fire_and_stay_quiet():
    """`promtool test rules` passes, and each alert in the rules file has a case where it
    fires and one where it does not: a new alert without both fails here."""
    tested = promtool("test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    doc = yaml.safe_load(RULE_TESTS.read_text())
    assert [RULES.name] == doc["rule_files"]
    cases = [c for t in doc["tests"] for c in t.get("alert_rule_test", [])]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    alerts = {r["alert"] for r in alert_rules()}
    assert alerts - fires == set(), f"alerts with no firing case in {RULE_TESTS.name}"
    assert alerts - quiet == set(), f"alerts with no quiet case in {RULE_TESTS.name}"
    assert fires | quiet <= alerts, "unit tests name an alert the rules file lacks"


@needs_promtool
def test_grafana_dashboard_queries_are_valid_promql(tmp_path):
    """Each panel query, loaded as a recording rule, passes promtool's PromQL parser."""
    exprs = dashboard_exprs()
    assert len(exprs) >= 8 and all(selectors(e) for e in exprs)
    rules = tmp_path / "dashboard-rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:panel_{i}", "expr": e} for i, e in enumerate(exprs)]}]}))
    checked = promtool("check", "rules", str(rules))
    assert checked.returncode == 0 and f"{len(exprs)} rules found" in checked.stdout, checked.stdout + checked.stderr
    rules.write_text(rules.read_text().replace("rate(", "rate((", 1))  # the check itself can fail
    assert promtool("check", "rules", str(rules)).returncode != 0


def test_automations_match_prefect_schema():
    from prefect.events.schemas.automations import AutomationCore

    from quantflow.platform.automations import load_automations

    autos = load_automations(REPO / "infra/automations/quantflow-alerts.yaml", str(uuid.uuid4()))
    assert {a.name for a in autos} == {"quantflow-quality-regression", "quantflow-latency-regression",
                                       "quantflow-endpoint-unreachable", "quantflow-gate-rejected"}
    assert all(isinstance(a, AutomationCore) for a in autos)


def test_every_alert_the_monitor_raises_has_an_automation():
    """Each alert kind in quantflow/monitoring reaches a shipped automation (by event name)."""
    from quantflow.platform.automations import load_automations

    source = "".join(p.read_text() for p in (REPO / "quantflow/monitoring").glob("*.py"))
    kinds = set(re.findall(r'raise_alert\(\s*state,\s*"(\w+)"', source))
    assert {"quality_regression", "latency_regression", "endpoint_unreachable"} <= kinds
    autos = load_automations(REPO / "infra/automations/quantflow-alerts.yaml", str(uuid.uuid4()))
    expected = {e for a in autos for e in a.trigger.expect}
    assert {f"quantflow.monitor.{k}" for k in kinds} <= expected, sorted(kinds)


def test_recovery_automation_reschedules_only_crashed_quantflow_runs():
    from prefect.events.actions import ChangeFlowRunState

    from quantflow.platform.automations import RECOVERY, load_automations

    (auto,) = load_automations(RECOVERY, "")
    assert auto.trigger.expect == {"prefect.flow-run.Crashed"}
    assert auto.trigger.match.root["prefect.run-count"] == ["0", "1", "2"]  # bounded: no endless loop
    assert set(auto.trigger.match_related.root["prefect.resource.name"]) == {
        "quantize-pipeline", "quantize-search", "requantize", "quantflow-stage"}
    (action,) = auto.actions
    assert isinstance(action, ChangeFlowRunState) and action.state.value == "SCHEDULED" and action.force


def test_compose_file_matches_the_compose_spec():
    proc = subprocess.run([str(Path(sys.executable).with_name("check-jsonschema")), "--builtin-schema",
                           "vendor.compose-spec", str(REPO / "infra/compose.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    services = yaml.safe_load((REPO / "infra/compose.yaml").read_text())["services"]
    assert {"postgres", "redis", "prefect-api", "prefect-services", "worker-cpu"} <= set(services)
    assert "--no-services" in services["prefect-api"]["command"]
    assert services["prefect-services"]["command"][-2:] == ["services", "start"]


def test_compose_sets_the_single_box_env_variables():
    """infra/compose.yaml and infra/single-box.env (the topology the platform tests run)
    name the same Prefect settings with the same values, up to the services' host names."""
    from quantflow.platform.topology import load_env_file

    saved = dict(os.environ)
    try:
        single_box = load_env_file(REPO / "infra/single-box.env")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    services = yaml.safe_load((REPO / "infra/compose.yaml").read_text())["services"]
    for service in ("prefect-api", "prefect-services"):
        env = services[service]["environment"]
        assert set(single_box) <= set(env), (service, set(single_box) - set(env))
        for key, value in single_box.items():
            if key == "PREFECT_API_DATABASE_CONNECTION_URL":
                assert env[key].startswith("postgresql+asyncpg://") and env[key].endswith("/prefect")
            else:
                assert env[key] == value.replace("127.0.0.1", "redis"), key
    worker = services["worker-cpu"]["environment"]
    redis_keys = {k for k in single_box if "REDIS" in k or "MESSAGING" in k}
    assert redis_keys <= set(worker), "workers take their stage locks from the same Redis"
    assert "PREFECT_API_DATABASE_CONNECTION_URL" not in worker


def test_work_pool_templates_are_current_and_render_valid_gpu_jobs():
    from prefect.utilities.templating import apply_values

    from quantflow.platform.job_templates import GPU_CLASSES, templates

    generated = templates()
    for name, template in generated.items():
        committed = json.loads((REPO / "infra/work-pools" / name).read_text())
        assert committed == template, f"{name} is stale: run python -m quantflow.platform.job_templates"
    for pool, spec in [("cpu", None), *GPU_CLASSES.items()]:
        t = generated[f"kubernetes-{pool}.json"]
        values = {k: v.get("default") for k, v in t["variables"]["properties"].items()}
        # What the Kubernetes worker passes in: command as a list, env as name/value pairs.
        values.update(name="quantflow-run", command=["prefect", "flow-run", "execute"], namespace="prefect",
                      env=[{"name": "PREFECT_API_URL", "value": "http://prefect-server:4200/api"}])
        job = apply_values(t["job_configuration"]["job_manifest"], values)
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)
        pod = job["spec"]["template"]["spec"]
        assert pod["containers"][0]["image"] == "ghcr.io/quantflow/pipeline:0.1.0-cuda"
        if spec is None:
            assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
            continue
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": spec["product"]}
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_helm_values_wire_pools_auth_and_templates():
    deployments = yaml.safe_load((REPO / "deployments/prefect.yaml").read_text())["deployments"]
    pools = {d["work_pool"]["name"] for d in deployments}
    assert pools == {"cpu", "gpu-a100", "gpu-h100"}
    server = yaml.safe_load((REPO / "infra/helm/prefect-server.yaml").read_text())
    assert server["server"]["basicAuth"]["enabled"] and server["backgroundServices"]["runAsSeparateDeployment"]
    assert server["redis"]["enabled"]  # separate background services need Redis
    for pool in pools:
        values = yaml.safe_load((REPO / f"infra/helm/prefect-worker-{pool}.yaml").read_text())["worker"]
        assert values["config"]["workPool"] == pool and values["apiConfig"] == "selfHostedServer"
        assert values["selfHostedServerApiConfig"]["basicAuth"]["enabled"]
        cm = values["config"]["baseJobTemplate"]["existingConfigMapName"]
        assert cm == f"quantflow-{pool}-job-template"
        assert (REPO / "infra/work-pools" / f"kubernetes-{pool}.json").exists()


def test_dockerfile_copies_only_what_exists():
    lines = [ln.strip() for ln in (REPO / "infra/Dockerfile").read_text().splitlines()]
    for ln in lines:
        if ln.startswith("FROM "):
            assert ":" in ln and not ln.endswith(":latest"), ln  # pinned base image
        if ln.startswith("COPY "):
            for src in ln.split()[1:-1]:
                assert (REPO / src.rstrip("/")).exists(), src
