"""Load a checkpoint (full precision or compressed-tensors) for evaluation, and prove it loaded.

transformers reports weights it could not place (MISSING: newly initialized; UNEXPECTED:
ignored; MISMATCH; CONVERSION errors) in a log table and goes on: a model whose experts never
loaded then runs on random weights (issue 20: every Mixtral scheme measured ~350 perplexity).
So every load here captures that report and is refused unless it is clean.

transformers 5 keeps a mixture-of-experts layer's experts as fused 3-D parameters and
converts per-expert checkpoints while loading; llm-compressor writes per-expert quantized
tensors, and for several formats that conversion fails or silently drops them. Such a
checkpoint is loaded the way llm-compressor built it instead: experts as one Linear each
(its `linearize_moe`), the quantization config applied and the tensors decompressed by
compressed-tensors like any dense layer, activation quantization included. `LoadedModel.path` says which way measured the model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantflow.errors import StageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PATH_DENSE = "transformers"
PATH_EXPERTS = ("compressed-tensors, experts as per-expert Linear layers (the layout "
                "llm-compressor quantized and saved)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
REPORT_LINES = 12  # of the loader's table, quoted in an error


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@dataclass
class LoadProblems:
    """What transformers could not place, from its loading info and its report."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    report: list[str] = field(default_factory=list)  # the loader's own table, plain text
    error: str | None = None  # what transformers raised after its report

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched or self.error)

    def describe(self) -> str:
        parts = []
        for what, keys in (("MISSING (newly initialized)", self.missing),
                           ("UNEXPECTED (not loaded)", self.unexpected), ("MISMATCH", self.mismatched)):
            if keys:
                more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
                parts.append(f"{len(keys)} {what}: {', '.join(keys[:3])}{more}")
        if self.error:
            parts.append(self.error)
        return "; ".join(parts)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    path: str = PATH_DENSE
    fallback_from: str | None = None  # why the plain transformers load was not used

    def __iter__(self):  # (model, tokenizer) = load_for_eval(...) keeps working
        return iter((self.model, self.tokenizer))


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "LOAD REPORT" in str(record.msg):
            self.lines += [_ANSI.sub("", ln).rstrip() for ln in record.getMessage().splitlines()
                           if ln.strip()]


@contextlib.contextmanager
def _report_capture():
    """transformers logs its load report at WARNING on its own logger, which quantflow keeps
    at ERROR: lower that one logger for the load and keep the report to ourselves."""
    logger = logging.getLogger("transformers.modeling_utils")
    handler = _Capture()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _keys(items) -> list[str]:
    return sorted(k if isinstance(k, str) else str(k[0]) for k in items or ())


def _load(loader, model_dir: str, dtype: torch.dtype, trust_remote_code: bool):
    with _report_capture() as capture:
        try:
            model, info = loader(model_dir, dtype=dtype, trust_remote_code=trust_remote_code,
                                 output_loading_info=True)
        except RuntimeError as err:  # conversion errors / size mismatches, raised after the report
            return None, LoadProblems(report=capture.lines, error=f"{type(err).__name__}: {err}")
    problems = LoadProblems(missing=_keys(info.get("missing_keys")),
                            unexpected=_keys(info.get("unexpected_keys")),
                            mismatched=_keys(info.get("mismatched_keys")), report=capture.lines)
    return model, problems


def _is_compressed_moe(model_dir: str) -> bool:
    import json

    from quantflow.quantization.architecture import is_moe

    config = json.loads((Path(model_dir) / "config.json").read_text())
    return ((config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors"
            and is_moe(config))


def _renamings(model_type: str) -> list[tuple[str, str]]:
    """transformers' own key renamings for the family (Mixtral: block_sparse_moe -> mlp),
    without its converters, which fuse experts: here they stay one Linear each."""
    from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN, get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    mapping = get_checkpoint_conversion_mapping(_MODEL_TO_CONVERSION_PATTERN.get(model_type, model_type)) or []
    return [(src, dst) for m in mapping if isinstance(m, WeightRenaming)
            for src, dst in zip(m.source_patterns, m.target_patterns)]


def _load_per_expert(model_dir: str, dtype: torch.dtype, trust_remote_code: bool):
    """The model as llm-compressor held it when it saved the checkpoint: experts linearized
    (one Linear per expert projection), the quantization config applied, the compressed
    tensors loaded by name and decompressed by compressed-tensors. Every checkpoint tensor
    must find its parameter and every parameter its tensor: that is the loading report."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantflow.storage.checkpoints import shard_files

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    qconfig = QuantizationConfig.model_validate(config.quantization_config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    linearize_moe(model)
    apply_quantization_config(model, qconfig)
    compressor = ModelCompressor(quantization_config=qconfig)
    compressor.compress_model(model)  # parameters take the checkpoint's compressed names and shapes
    renames = _renamings(config.model_type)
    state: dict[str, torch.Tensor] = {}
    for shard in shard_files(Path(model_dir)):
        for key, tensor in load_file(shard).items():
            for src, dst in renames:
                key = re.sub(src, dst, key)
            state[key] = tensor
    expected = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(t.shape)} vs model {tuple(expected[k].shape)}"
                  for k, t in state.items() if k in expected and expected[k].shape != t.shape]
    result = model.load_state_dict({k: t for k, t in state.items()
                                    if k not in expected or expected[k].shape == t.shape}, strict=False)
    tied: set[str] = set()
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        tied = {k for k in result.missing_keys if k.startswith("lm_head.")}
    compressor.decompress_model(model)
    problems = LoadProblems(missing=sorted(set(result.missing_keys) - tied),
                            unexpected=sorted(result.unexpected_keys), mismatched=mismatched)
    problems.report = ([f"{k}  MISSING" for k in problems.missing[:REPORT_LINES]]
                       + [f"{k}  UNEXPECTED" for k in problems.unexpected[:REPORT_LINES]]
                       + problems.mismatched[:REPORT_LINES])
    return model, problems


def refusal(stage: str, what: str, model_dir: str, problems: LoadProblems,
            loaded: LoadedModel | None = None) -> StageError:
    """The StageError for a load that left weights out, quoting the loader's own report.
    After the per-expert fallback, both attempts are named."""
    report = "\n".join(f"    {ln}" for ln in problems.report[:REPORT_LINES])
    more = (f"\n    … {len(problems.report) - REPORT_LINES} more lines"
            if len(problems.report) > REPORT_LINES else "")
    if loaded is not None and loaded.fallback_from:
        head = (f"transformers did not load every weight of {what} ({model_dir}): {loaded.fallback_from}; "
                f"nor did the per-expert layout ({PATH_EXPERTS}): {problems.describe()}")
        source = "the per-expert load's report"
    else:
        head = f"transformers did not load every weight of {what} ({model_dir}): {problems.describe()}"
        source = "transformers' load report"
    return StageError(stage, head + (f"\n  {source}:\n{report}{more}" if report else ""),
                      "nothing was measured on a partly loaded model. Check that the checkpoint "
                      "matches its config.json (architecture, expert count and names); for a "
                      "quantized mixture-of-experts checkpoint, that llm-compressor and "
                      "transformers versions match the ones that wrote it (`quantflow doctor`)")


def load_for_eval(model_dir: str | Path, dtype: str, device: str, trust_remote_code: bool = False,
                  stage: str = "validate", what: str = "the model") -> LoadedModel:
    """The model in eval mode, every weight loaded, or a StageError quoting the loader.
    Quantized checkpoints are decompressed by compressed-tensors on load, so both models run
    the same dense kernels and any difference in the numbers comes from the quantized weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_libraries()
    model_dir = str(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model, problems = _load(AutoModelForCausalLM.from_pretrained, model_dir, DTYPES[dtype],
                            trust_remote_code)
    loaded = LoadedModel(model, tokenizer)
    if problems and _is_compressed_moe(model_dir):
        logging.getLogger("quantflow.evaluate").info(
            "%s: transformers' fused-experts load failed (%s); loading experts per layer instead",
            what, problems.describe()[:300])
        fallback_from = problems.describe()
        del model
        model, problems = _load_per_expert(model_dir, DTYPES[dtype], trust_remote_code)
        loaded = LoadedModel(model, tokenizer, PATH_EXPERTS, fallback_from)
    if problems:
        raise refusal(stage, what, model_dir, problems, loaded)
    loaded.model.to(pick_device(device)).eval()
    return loaded
