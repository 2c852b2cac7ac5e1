"""Run a recipe with llm-compressor and save a compressed-tensors checkpoint."""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path

import torch

from quantflow.config import ModelSpec, QuantConfig
from quantflow.quantization import cpu_pinning
from quantflow.quantization.architecture import expert_count
from quantflow.quantization.expert_coverage import count_expert_tokens
from quantflow.quantization.layer_progress import layer_progress
from quantflow.quantization.recipes import recipe_yaml, streaming_scheme

log = logging.getLogger("quantflow.quantize")

# Embeddings are not Linear layers, but model_free_ptq matches "Linear" by tensor name and
# would quantize them (breaking tied-embedding models), so the streaming path keeps them.
STREAMING_EXTRA_IGNORE = ["re:.*embed_tokens$", "re:.*wte$", "re:.*embed_in$"]


def calibration_dataset(ids: torch.Tensor):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": ids.tolist(),
                              "attention_mask": torch.ones_like(ids).tolist()})


def run_streaming(model_dir: Path, q: QuantConfig, out_dir: Path, device: str) -> str:
    from compressed_tensors.quantization import QuantizationScheme
    from llmcompressor import model_free_ptq

    scheme = streaming_scheme(q)
    assert scheme is not None
    if isinstance(scheme, dict):
        scheme = QuantizationScheme(**scheme)
    model_free_ptq(str(model_dir), str(out_dir), scheme=scheme,
                   ignore=list(q.ignore) + STREAMING_EXTRA_IGNORE, device=device,
                   max_workers=min(4, os.cpu_count() or 1))
    return "model_free_ptq"


def run_oneshot(model_dir: Path, q: QuantConfig, calib_ids: torch.Tensor | None,
                out_dir: Path, model_spec: ModelSpec | None = None,
                coverage: dict | None = None) -> str:
    """`coverage`, when given, is filled with the calibration tokens routed to each expert
    of each MoE layer (expert_coverage.py); it stays empty for dense models."""
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Any recipe may contain AWQ (method awq, or a user recipe), so the shim is installed
    # for every oneshot run; it only exists where there is no accelerator.
    if cpu_pinning.apply():
        log.debug("no accelerator: activation pinning disabled (cpu_pinning.py)")
    spec = model_spec or ModelSpec(id=str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=spec.trust_remote_code)
    # Sequential onloading: loaded on the CPU, and llm-compressor's sequential pipeline moves
    # one decoder layer at a time to the accelerator, so GPU memory bounds a layer, not the
    # model. Without it the "basic" pipeline calibrates wherever the model is, so the whole
    # model goes to the GPU first (measured on an H200: left on the CPU it ran 19x slower).
    whole_on_gpu = not q.sequential_onloading and q.device != "cpu" and torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=spec.dtype,
                                                 trust_remote_code=spec.trust_remote_code,
                                                 device_map="cuda" if whole_on_gpu else None)
    kwargs = {}
    if calib_ids is not None:
        kwargs = dict(dataset=calibration_dataset(calib_ids), num_calibration_samples=len(calib_ids),
                      max_seq_length=calib_ids.shape[1],
                      # Fixed sample order: same samples in => bit-identical tensors out.
                      shuffle_calibration_samples=False)
        if not q.sequential_onloading:
            # Whole model on the accelerator at once: faster when it fits. The default
            # ("independent") gives every calibrating modifier llm-compressor's sequential
            # pipeline, one decoder layer on the accelerator at a time.
            kwargs["pipeline"] = "basic"
    text_cfg = model.config.get_text_config()
    experts = expert_count(text_cfg.to_dict())
    with count_expert_tokens(model, experts, getattr(text_cfg, "num_experts_per_tok", 0) or 0,
                             len(calib_ids) if calib_ids is not None else 0) as counted, \
            layer_progress(model):
        oneshot(model=model, tokenizer=tokenizer, recipe=recipe_yaml(q), **kwargs)
    if coverage is not None:
        coverage.update(counted)
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)
    del model
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # validation or serving in this process needs the GPU next
    return "oneshot"


def quantize(model_dir: Path, q: QuantConfig, calib_ids: torch.Tensor | None, out_dir: Path,
             device: str, model: ModelSpec | None = None, coverage: dict | None = None) -> str:
    """Quantize into out_dir; returns which llm-compressor entry point ran."""
    if streaming_scheme(q) is not None:
        return run_streaming(model_dir, q, out_dir, device)
    return run_oneshot(model_dir, q, calib_ids if q.needs_calibration else None, out_dir, model, coverage)
