"""What cannot run here (clusters, Prometheus, Grafana) is validated statically."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from quantflow.config import DeployConfig
from quantflow.manifests import QuantizedManifest
from quantflow.serving.kubernetes import render

REPO = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.31.0"
EXPORTED = {"llm_quantization_quality_score", "llm_inference_latency_seconds_bucket",
            "llm_inference_latency_seconds_count", "llm_token_throughput_per_second",
            "llm_quality_regression_alerts_total"}
VLLM = {"vllm:e2e_request_latency_seconds_bucket", "vllm:time_to_first_token_seconds_bucket",
        "vllm:generation_tokens_total", "vllm:prompt_tokens_total"}


def quantized() -> QuantizedManifest:
    return QuantizedManifest(uri="s3://models/x/quantized_model", files={"model.safetensors": "a" * 64},
                             label="gptq-w4a16-g128", method="gptq", entry_point="oneshot", recipe="",
                             quantization_format="pack-quantized", size_bytes=1, baseline_size_bytes=4)


@pytest.mark.parametrize("overrides", [
    {},
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
    deployment, _ = render(DeployConfig(backend="kubernetes"), quantized(), "x")
    deployment["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def _exprs_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\b(llm_[a-z0-9_]+|vllm:[a-z0-9_]+)", expr))


def test_prometheus_rules_reference_real_metrics():
    doc = yaml.safe_load((REPO / "infra/monitoring/prometheus-rules.yaml").read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert len(rules) >= 5
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical") and r["annotations"]["summary"]
        used = _exprs_metrics(r["expr"])
        assert used and used <= EXPORTED | VLLM, (r["alert"], used)


def test_grafana_dashboard_queries_real_metrics():
    dash = json.loads((REPO / "infra/monitoring/grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 8
    for e in exprs:
        assert _exprs_metrics(e) <= EXPORTED | VLLM, e


def test_automations_match_prefect_schema():
    from prefect.events.schemas.automations import AutomationCore

    from quantflow.platform.automations import load_automations

    autos = load_automations(REPO / "infra/automations/quantflow-alerts.yaml", str(uuid.uuid4()))
    assert {a.name for a in autos} == {"quantflow-quality-regression", "quantflow-latency-regression",
                                       "quantflow-gate-rejected"}
    assert all(isinstance(a, AutomationCore) for a in autos)
