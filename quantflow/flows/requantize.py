"""Scheduled re-quantization: run the pipeline only when something that determines its
output changed since the last successful run — the upstream model (hub commit or local
files), the calibration data, the toolchain versions, or the config itself."""

from __future__ import annotations

import logging

from prefect import flow

from quantflow.storage.checkpoints import cheap_fingerprint, looks_like_path
from quantflow.config import PipelineConfig, TextSource
from quantflow.flows.pipeline import quantize_pipeline
from quantflow.storage.content_digest import path_digest
from quantflow.storage.hashing import digest_of
from quantflow.storage.store import ArtifactStore
from quantflow.tasks.policy import code_digest, recipe_digest
from quantflow.versions import tool_versions

log = logging.getLogger("quantflow.requantize")
STATE = "requantize_state.json"


def data_fingerprint(source: TextSource) -> str:
    # By content, as the stage cache keys are: an edit that keeps size and mtime (cp -p,
    # rsync -t) still triggers a requantize; a touch alone does not.
    local = path_digest(source.dataset)
    if local is not None:
        return local
    if looks_like_path(source.dataset):
        return digest_of(["missing", source.dataset])
    try:
        from huggingface_hub import HfApi

        sha = HfApi().dataset_info(source.dataset).sha
    except Exception:  # noqa: BLE001 - offline: the name is all we can know
        sha = None
    return digest_of([source.dataset, source.subset, source.split, source.data_files, sha])


def inputs_fingerprint(config: PipelineConfig) -> dict[str, str]:
    """What decides the pipeline's output, each part hashed on its own so the log can say
    which one changed."""
    return {"model": cheap_fingerprint(config.model),  # hub: the revision's commit sha
            "calibration": data_fingerprint(config.calibration.source),
            "heldout": data_fingerprint(config.validation.perplexity.source),
            "toolchain": digest_of([tool_versions(), code_digest()]),
            "config": digest_of([config.model_dump(mode="json"), recipe_digest(config.quant)])}


@flow(name="requantize", log_prints=False)  # see flows/pipeline.py
def requantize(config: PipelineConfig, force: bool = False):
    """Re-run the pipeline if the model, calibration data, toolchain or config changed."""
    store = ArtifactStore(config.output_uri)
    current = inputs_fingerprint(config)
    last = store.read_json(STATE)["inputs"] if store.exists(STATE) else None
    changed = sorted(k for k in current if not last or last.get(k) != current[k])
    if not changed and not force:
        log.info("requantize: nothing changed since the last successful run; skipping")
        return {"ran": False, "changed": []}
    log.info("requantize: %s changed; running the pipeline", ", ".join(changed) or "forced")
    state = quantize_pipeline(config=config, return_state=True)
    if not state.is_completed():
        return state  # this run ends as the pipeline did (e.g. QualityGateFailed)
    store.write_json(STATE, {"inputs": current})
    return {"ran": True, "changed": changed, "state": state.name}
