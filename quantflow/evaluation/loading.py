"""Load a checkpoint (full precision or compressed-tensors) for evaluation."""

from __future__ import annotations

import os
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def load_for_eval(model_dir: str | Path, dtype: str, device: str, trust_remote_code: bool = False):
    """(model, tokenizer) in eval mode. Quantized checkpoints are decompressed by
    compressed-tensors on load, so both models run the same dense kernels and any
    difference in the numbers comes from the quantized weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_libraries()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype],
                                                 trust_remote_code=trust_remote_code)
    model.to(pick_device(device)).eval()
    return model, tokenizer
