"""Stage 3: run the llm-compressor recipe for the chosen method; save compressed-tensors."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import torch
from prefect import task

from quantflow.storage.artifacts import begin_outputs, finish_outputs, load_calibration, local_checkpoint
from quantflow.storage.checkpoints import read_config, resolve_model, shard_files, read_safetensors_header
from quantflow.config import ModelSpec, QuantConfig
from quantflow.errors import StageError
from quantflow.storage.manifests import CalibrationManifest, CheckpointManifest, QuantizedManifest
from quantflow.profiling import measure
from quantflow.progress import report, stage_progress
from quantflow.quantization.architecture import describe, full_precision_modules
from quantflow.quantization.expert_coverage import summarize, warn_if_starved
from quantflow.quantization.group_size import group_size_problem
from quantflow.quantization.recipes import recipe_yaml
from quantflow.quantization.runner import quantize
from quantflow.storage.hashing import tree_sha256
from quantflow.storage.store import ArtifactStore
from quantflow.tasks.policy import stage_task_options
from quantflow.versions import tool_versions

log = logging.getLogger("quantflow.quantize")
STAGE = "quantize"
OUTPUT = "quantized_model"


def preflight(quant: QuantConfig, calibration: CalibrationManifest | None,
              model_dir: Path | None = None) -> str:
    """Refuse before loading anything when the run cannot succeed."""
    if model_dir is not None and (model_dir / "config.json").is_file():
        # The CLI checks this before stage 1 for local folders; a hub checkpoint (or a run
        # submitted to a work pool) is first seen here.
        problem = group_size_problem(quant, read_config(model_dir), model_dir)
        if problem:
            raise StageError(STAGE, f"quant.group_size: {problem[0]}", problem[1])
    if quant.device == "cuda" and not torch.cuda.is_available():
        raise StageError(STAGE, "quant.device is 'cuda' but this machine has no usable GPU "
                         "(torch.cuda.is_available() is False)",
                         "run this stage on a GPU work pool, or set quant.device: cpu")
    if quant.needs_calibration and quant.method != "recipe" and calibration is None:
        raise StageError(STAGE, f"method {quant.method!r} needs calibration data and none was given")
    if quant.method == "recipe" and quant.recipe and not Path(quant.recipe).is_file():
        raise StageError(STAGE, f"quant.recipe: {quant.recipe} does not exist",
                         "pass the path of an llm-compressor recipe YAML")
    if quant.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return quant.device


def _copy_prequantized(quant: QuantConfig, dest: Path) -> str:
    src = resolve_model(ModelSpec(id=quant.checkpoint or ""))
    config = read_config(src)
    if "quantization_config" not in config:
        raise StageError(STAGE, f"quant.checkpoint: {src} has no quantization_config in "
                         "config.json, so it is not a quantized checkpoint",
                         "point quant.checkpoint at a GPTQ, AWQ or compressed-tensors checkpoint, "
                         "or pick a quantization method")
    for shard in shard_files(src):
        read_safetensors_header(shard)
    fmt = config["quantization_config"].get("quant_method")
    if fmt in ("gptq", "awq") and importlib.util.find_spec("gptqmodel") is None:
        raise StageError(STAGE, f"quant.checkpoint is in {fmt.upper()} format; validating it means running "
                         "it in transformers, which needs the gptqmodel kernels (not in the pipeline "
                         "environment, and GPU-only)",
                         "pip install gptqmodel on a GPU worker, or use a compressed-tensors checkpoint")
    shutil.copytree(src, dest, dirs_exist_ok=True)
    return "none"


def with_architecture_ignores(quant: QuantConfig, model_config: dict) -> QuantConfig:
    """The user's ignore list plus the modules this architecture keeps in full precision
    (MoE routers: architecture.py), so the recipe written next to the checkpoint says so."""
    extra = [p for p in full_precision_modules(model_config) if p not in quant.ignore]
    if not extra:
        return quant
    log.info("quantize: %s: keeping router gates in full precision (%s)", describe(model_config),
             ", ".join(extra))
    return quant.model_copy(update={"ignore": [*quant.ignore, *extra]})


def quantize_model(quant: QuantConfig, checkpoint: CheckpointManifest,
                   calibration: CalibrationManifest | None, output_uri: str,
                   min_expert_tokens: int = 16) -> QuantizedManifest:
    """`min_expert_tokens` (calibration.min_tokens_per_expert): an MoE expert the router sent
    fewer calibration tokens is named in a warning and in the report."""
    store = ArtifactStore(output_uri)
    device = preflight(quant, calibration, Path(checkpoint.local_path))
    begin_outputs(store, STAGE)
    scratch = store.scratch_dir(OUTPUT)
    try:
        with measure() as usage, stage_progress(STAGE, ["decoder layers", "writing"]):
            coverage = None
            if quant.method == "prequantized":
                entry = _copy_prequantized(quant, scratch)
                recipe = None
            else:
                ids = load_calibration(calibration, STAGE) if calibration is not None else None
                model_dir = local_checkpoint(checkpoint, STAGE)
                quant = with_architecture_ignores(quant, read_config(model_dir))
                recipe = recipe_yaml(quant)
                log.info("quantize: %s (%s) on %s", quant.label, "calibrated" if quant.needs_calibration
                         else "data-free", device)
                routed: dict = {}
                entry = quantize(model_dir, quant, ids, scratch, device, model=checkpoint.model,
                                 coverage=routed)
                coverage = summarize(routed, min_expert_tokens)
                if coverage:
                    coverage["warning"] = warn_if_starved(coverage)
                    log.info("quantize: routed calibration tokens per expert: min %d, median %g, max %d "
                             "over %d layers x %d experts", coverage["routed_tokens"]["min"],
                             coverage["routed_tokens"]["median"], coverage["routed_tokens"]["max"],
                             coverage["layers"], coverage["experts_per_layer"])
                (scratch / "quantflow_recipe.yaml").write_text(recipe)
            report("writing", 0, 1, "writing the compressed checkpoint")
            qconfig = json.loads((scratch / "config.json").read_text()).get("quantization_config", {})
            files = tree_sha256(scratch)
            size = sum(p.stat().st_size for p in scratch.glob("*.safetensors"))
            uri = store.put_dir(scratch, OUTPUT)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # gone after a successful put_dir; cleanup otherwise
    log.info("quantize: %s written (%.2f MB, baseline %.2f MB) in %.1fs", uri, size / 1e6,
             checkpoint.architecture["size_bytes"] / 1e6, usage.wall_s)
    return finish_outputs(store, STAGE, QuantizedManifest(
        uri=uri, files=files, label=quant.label, method=quant.method, entry_point=entry,
        recipe=recipe, quantization_format=qconfig.get("format") or qconfig.get("quant_method"),
        size_bytes=size, baseline_size_bytes=checkpoint.architecture["size_bytes"],
        expert_coverage=coverage, versions=tool_versions(), usage=vars(usage)))


quantize_task = task(**stage_task_options(STAGE))(quantize_model)
