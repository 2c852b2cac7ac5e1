"""Stage 1 and 2 settings: which checkpoint, and which calibration text."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from quantflow.config.base import StrictModel


class ModelSpec(StrictModel):
    id: str = Field(min_length=1)
    '''A Hugging Face hub id ("meta-llama/Llama-3.1-8B") or a local directory.'''
    revision: str | None = None
    """Hub revision (commit sha, branch or tag); pin a commit for reproducible cache keys."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    '''Precision the baseline is loaded and evaluated in; "auto" keeps the checkpoint's dtype.'''
    trust_remote_code: bool = False
    """Run the model's own Python code from its repository (transformers' trust_remote_code). Off
    by default: only turn it on for repositories you trust."""


class TextSource(StrictModel):
    """Text from a hub data set (by name) or from local .txt / .jsonl / .json files."""

    dataset: str = Field(min_length=1)
    '''Hub data set name (e.g. "allenai/c4") or a local file or directory.'''
    subset: str | None = None
    '''Hub data set configuration ("wikitext-2-raw-v1"); ignored for local files.'''
    split: str = "train"
    """Hub data set split to read (train, validation, test); ignored for local files."""
    text_field: str = "text"
    """Column holding the text in JSON/JSONL rows and hub data sets."""
    format: Literal["text", "chat"] = "text"
    '''"chat": rows are conversations (messages_field: a list of {role, content} turns), rendered
    with the tokenizer's chat template, as instruct models are calibrated.'''
    messages_field: str = "messages"
    """With format chat: the column holding each conversation, a list of {role, content} turns."""
    data_files: str | list[str] | None = None
    """Hub data files to read instead of the whole split (C4 is terabytes; one shard is plenty)."""


class CalibrationConfig(StrictModel):
    source: TextSource = TextSource(
        dataset="allenai/c4", data_files="en/c4-train.00000-of-01024.json.gz")
    """Where the calibration text comes from: a hub data set or local files (plain text, or
    conversations with format chat)."""
    num_samples: int = Field(default=256, ge=1, le=100_000, title="Calibration samples", examples=[256, 512])
    """Calibration samples (sequences) drawn; GPTQ, AWQ and SmoothQuant see num_samples x seq_len
    tokens."""
    seq_len: int = Field(default=2048, ge=8, le=131_072,
                         title="Tokens per calibration sample", examples=[512, 2048])
    """Tokens per calibration sample."""
    seed: int = 42
    """Seed of the document order and sampling, so the same config draws the same tokens (and hits
    the cache)."""
    min_unique_token_ratio: float = Field(default=0.02, gt=0, le=1,
                                          title="Min distinct-token ratio (0-1)", examples=[0.02])
    """Warn when fewer than this fraction of the drawn tokens are distinct: repeated boilerplate
    calibrates the quantizer to one kind of text."""
    min_tokens_per_expert: int = Field(default=16, ge=0,
                                       title="Min calibration tokens per expert", examples=[16])
    """Mixture-of-experts: warn, naming them, about experts the router sends fewer calibration
    tokens than this (counted while quantizing; every expert is still calibrated on all)."""
