"""Work-pool base job templates for the GPU classes, derived from Prefect's defaults.

Prefect's Kubernetes template has no GPU limit, node selector or tolerations; these add
them as variables (with per-class defaults) so a deployment or run can override them.
Written to infra/work-pools/ by `python -m quantflow.platform.job_templates`; a test
checks the committed files equal this output.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "infra" / "work-pools"
IMAGE = "ghcr.io/quantflow/pipeline:0.1.0-cuda"
GPU_CLASSES = {
    "gpu-a100": {"product": "NVIDIA-A100-SXM4-80GB", "memory": "120Gi", "cpu": "12"},
    "gpu-h100": {"product": "NVIDIA-H100-80GB-HBM3", "memory": "200Gi", "cpu": "16"},
}
TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def prefect_default(worker_type: str) -> dict:
    out = subprocess.run([str(Path(sys.executable).with_name("prefect")), "work-pool",
                          "get-default-base-job-template", "--type", worker_type],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def kubernetes_cpu(default: dict) -> dict:
    """The orchestration pool: Prefect's template with the pipeline image, whose flow code
    lives in /opt/quantflow (the deployments' pull step reads $QUANTFLOW_HOME)."""
    t = copy.deepcopy(default)
    props = t["variables"]["properties"]
    props["image"]["default"] = IMAGE
    props["env"]["default"] = {"QUANTFLOW_HOME": "/opt/quantflow"}
    # The orchestrating flow waits on GPU stages and runs calibration/deploy bookkeeping.
    props["cpu_request"]["default"], props["cpu_limit"]["default"] = "1", "2"
    props["memory_request"]["default"], props["memory_limit"]["default"] = "4Gi", "8Gi"
    job_spec = t["job_configuration"]["job_manifest"]["spec"]
    pod = job_spec["template"]["spec"]
    # Prefect's default puts these Job fields in the pod spec, where strict field
    # validation rejects them; they belong to the Job.
    for field in ("completions", "parallelism"):
        if field in pod:
            job_spec[field] = pod.pop(field)
    return t


def kubernetes_gpu(default: dict, pool: str) -> dict:
    spec = GPU_CLASSES[pool]
    t = kubernetes_cpu(default)
    props = t["variables"]["properties"]
    props["gpu_count"] = {"title": "GPUs", "type": "integer", "default": 1, "minimum": 1,
                          "description": "nvidia.com/gpu limit of the flow-run pod."}
    props["node_selector"] = {"title": "Node selector", "type": "object",
                              "additionalProperties": {"type": "string"},
                              "default": {"nvidia.com/gpu.product": spec["product"]},
                              "description": "Nodes the pod may run on (GPU feature discovery labels)."}
    props["tolerations"] = {"title": "Tolerations", "type": "array", "items": {"type": "object"},
                            "default": TOLERATIONS, "description": "Taints the pod tolerates."}
    props["shm_size"] = {"title": "Shared memory", "type": "string", "default": "16Gi",
                         "description": "Size of /dev/shm (PyTorch data loading and NCCL need more than 64M)."}
    props["cpu_request"]["default"] = props["cpu_limit"]["default"] = spec["cpu"]
    props["memory_request"]["default"] = props["memory_limit"]["default"] = spec["memory"]
    pod = t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    container["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpu_count }}"
    container["resources"]["requests"]["nvidia.com/gpu"] = "{{ gpu_count }}"
    container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    pod["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "{{ shm_size }}"}}]
    pod["nodeSelector"] = "{{ node_selector }}"
    pod["tolerations"] = "{{ tolerations }}"
    return t


def process_gpu(default: dict, pool: str) -> dict:
    """Bare-metal GPU hosts: a process worker per host, pinned to its GPUs."""
    t = copy.deepcopy(default)
    props = t["variables"]["properties"]
    props["env"]["default"] = {"CUDA_VISIBLE_DEVICES": "0", "QUANTFLOW_HOME": "/opt/quantflow"}
    props["working_dir"]["default"] = "/opt/quantflow"
    props["env"]["description"] += f" Defaults pin the run to GPU 0 of this {pool} host."
    return t


def templates() -> dict[str, dict]:
    k8s, proc = prefect_default("kubernetes"), prefect_default("process")
    out = {"kubernetes-cpu.json": kubernetes_cpu(k8s)}
    for pool in GPU_CLASSES:
        out[f"kubernetes-{pool}.json"] = kubernetes_gpu(k8s, pool)
        out[f"process-{pool}.json"] = process_gpu(proc, pool)
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, t in templates().items():
        (OUT / name).write_text(json.dumps(t, indent=2) + "\n")
        print(OUT / name)


if __name__ == "__main__":
    main()
