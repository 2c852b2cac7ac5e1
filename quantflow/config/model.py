"""Stage 1 and 2 settings: which checkpoint, and which calibration text."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from quantflow.config.base import StrictModel


class ModelSpec(StrictModel):
    # A Hugging Face hub id ("meta-llama/Llama-3.1-8B") or a local directory.
    id: str = Field(min_length=1)
    # Hub revision (commit sha, branch or tag); pin a commit for reproducible cache keys.
    revision: str | None = None
    # Precision the baseline is loaded and evaluated in; "auto" keeps the checkpoint's dtype.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False


class TextSource(StrictModel):
    """Text from a hub data set (by name) or from local .txt / .jsonl / .json files."""

    # Hub data set name (e.g. "allenai/c4") or a local file or directory.
    dataset: str = Field(min_length=1)
    # Hub data set configuration ("wikitext-2-raw-v1"); ignored for local files.
    subset: str | None = None
    split: str = "train"
    # Column holding the text in JSON/JSONL rows and hub data sets.
    text_field: str = "text"
    # "chat": rows are conversations (messages_field: a list of {role, content} turns),
    # rendered with the tokenizer's chat template, as instruct models are calibrated.
    format: Literal["text", "chat"] = "text"
    messages_field: str = "messages"
    # Hub data files to read instead of the whole split (C4 is terabytes; one shard is plenty).
    data_files: str | list[str] | None = None


class CalibrationConfig(StrictModel):
    source: TextSource = TextSource(
        dataset="allenai/c4", data_files="en/c4-train.00000-of-01024.json.gz")
    num_samples: int = Field(default=256, ge=1, le=100_000)
    seq_len: int = Field(default=2048, ge=8, le=131_072)
    seed: int = 42
    # Warn when fewer than this fraction of the drawn tokens are distinct: repeated
    # boilerplate calibrates the quantizer to one kind of text.
    min_unique_token_ratio: float = Field(default=0.02, gt=0, le=1)
    # Mixture-of-experts: warn, naming them, about experts the router sends fewer calibration
    # tokens than this (counted while quantizing; every expert is still calibrated on all).
    min_tokens_per_expert: int = Field(default=16, ge=0)
