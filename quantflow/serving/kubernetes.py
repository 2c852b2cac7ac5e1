"""The `kubernetes` serving backend: a Deployment + Service for the vllm/vllm-openai image.

Manifests are rendered from DeployConfig (GPU limits, node selector for the GPU product,
tolerations, the checkpoint on a PersistentVolumeClaim) and applied with the Kubernetes
API when a cluster is configured. No cluster exists where quantflow is developed: the
rendered manifests are validated against the Kubernetes schemas in the tests, and the
apply path is untested live (see docs/serving.md).
"""

from __future__ import annotations

import re
from typing import Any

from quantflow.config import DeployConfig
from quantflow.errors import StageError
from quantflow.storage.manifests import QuantizedManifest, now
from quantflow.serving.process import engine_args

STAGE = "deploy"
PORT = 8000


def k8s_name(name: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-")[:53] or "quantflow"


def render(cfg: DeployConfig, quantized: QuantizedManifest, name: str) -> list[dict[str, Any]]:
    k = cfg.kubernetes
    app = k8s_name(name)
    labels = {"app.kubernetes.io/name": app, "app.kubernetes.io/managed-by": "quantflow",
              "quantflow.io/checkpoint-sha256": quantized.checkpoint_sha256[:63]}
    served = cfg.served_model_name or name
    args = ["--model", f"/models/{k.model_subpath}", "--served-model-name", served,
            "--host", "0.0.0.0", "--port", str(PORT), *engine_args(cfg, cfg.max_model_len),
            "--gpu-memory-utilization", str(cfg.gpu_memory_utilization), *cfg.extra_args]
    env = [{"name": "HF_HUB_OFFLINE", "value": "1"}]
    if k.api_key_secret:
        env.append({"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": k.api_key_secret,
                                                                          "key": "api-key"}}})
    selector = dict(k.node_selector)
    if k.gpu_product:
        selector["nvidia.com/gpu.product"] = k.gpu_product
    gpus = max(k.gpus, cfg.tensor_parallel_size)
    container = {
        "name": "vllm", "image": k.image, "args": args, "env": env,
        "ports": [{"name": "http", "containerPort": PORT}],
        "resources": {"limits": {"nvidia.com/gpu": str(gpus), "memory": k.memory, "cpu": k.cpu},
                      "requests": {"nvidia.com/gpu": str(gpus), "memory": k.memory, "cpu": k.cpu}},
        "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True},
                         {"name": "shm", "mountPath": "/dev/shm"}],
        # /health only says the server is up; readiness waits for it, liveness restarts a hung one.
        "readinessProbe": {"httpGet": {"path": "/health", "port": PORT}, "periodSeconds": 5,
                           "failureThreshold": 3},
        "startupProbe": {"httpGet": {"path": "/health", "port": PORT}, "periodSeconds": 10,
                         "failureThreshold": max(1, int(cfg.startup_timeout_s // 10))},
        "livenessProbe": {"httpGet": {"path": "/health", "port": PORT}, "periodSeconds": 15,
                          "failureThreshold": 4},
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": app, "namespace": k.namespace, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": app}},
            # Surge one pod and keep the old one until the new one is ready: the cluster's
            # version of quantflow's local blue/green rollout.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": selector,
                    "tolerations": [dict(t) for t in k.tolerations],
                    "containers": [container],
                    "volumes": [
                        {"name": "models", "persistentVolumeClaim": {"claimName": k.model_pvc,
                                                                     "readOnly": True}},
                        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}},
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": app, "namespace": k.namespace, "labels": labels},
        "spec": {"type": k.service_type, "selector": {"app.kubernetes.io/name": app},
                 "ports": [{"name": "http", "port": PORT, "targetPort": "http"}]},
    }
    return [deployment, service]


def deploy_to_cluster(cfg: DeployConfig, quantized: QuantizedManifest, name: str) -> dict:
    """Apply the manifests (server-side apply). Untested live: no cluster here."""
    try:
        from kubernetes import client, config as kconfig, utils  # noqa: F401
    except ImportError:
        raise StageError(STAGE, "deploy.backend is 'kubernetes' but the kubernetes client is not "
                         "installed", "pip install 'quantflow[kubernetes]'") from None
    try:
        try:
            kconfig.load_incluster_config()
        except kconfig.ConfigException:
            kconfig.load_kube_config(context=cfg.kubernetes.context)
    except Exception as err:  # noqa: BLE001
        raise StageError(STAGE, f"no Kubernetes cluster configured: {err}",
                         "set KUBECONFIG / deploy.kubernetes.context, or use deploy.backend: local") from None
    manifests = render(cfg, quantized, name)
    api = client.ApiClient()
    for m in manifests:
        utils.create_from_dict(api, m, namespace=cfg.kubernetes.namespace, apply=True)
    app = manifests[0]["metadata"]["name"]
    return {"backend": "kubernetes", "name": name, "namespace": cfg.kubernetes.namespace,
            "deployment": app, "service": app,
            "base_url": f"http://{app}.{cfg.kubernetes.namespace}.svc:{PORT}",
            "served_model_name": cfg.served_model_name or name, "label": quantized.label,
            "checkpoint_sha256": quantized.checkpoint_sha256, "deployed_at": now()}
