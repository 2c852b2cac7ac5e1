"""Search stage: per-decoder-layer sensitivity to a candidate's integer scheme (cached)."""

from __future__ import annotations

import logging

from prefect import task

from quantflow.storage.artifacts import load_calibration, local_checkpoint
from quantflow.config import QuantConfig
from quantflow.evaluation.loading import load_for_eval
from quantflow.storage.manifests import CalibrationManifest, CheckpointManifest
from quantflow.profiling import measure
from quantflow.quantization.sensitivity import measure_sensitivity
from quantflow.tasks.policy import stage_task_options

log = logging.getLogger("quantflow.sensitivity")
STAGE = "sensitivity"


def layer_sensitivity(quant: QuantConfig, checkpoint: CheckpointManifest,
                      calibration: CalibrationManifest, samples: int, dtype: str,
                      output_uri: str) -> dict:
    """`output_uri` is only part of the cache key's inputs, like every stage's; the flow
    writes sensitivity.json from the result."""
    with measure() as usage:
        ids = load_calibration(calibration, STAGE)[:samples]
        model, _ = load_for_eval(local_checkpoint(checkpoint, STAGE), dtype, "auto",
                                 trust_remote_code=checkpoint.model.trust_remote_code)
        doc = measure_sensitivity(model, ids, quant)
        del model
    return {**doc, "usage": vars(usage)}


_options = stage_task_options(STAGE)
# The result is the data (small JSON), not a manifest pointing at files.
sensitivity_task = task(**_options)(layer_sensitivity)
