"""Stage 2: seeded token samples for calibration, checked before hours of GPU work use them."""

from __future__ import annotations

import io
import logging
import random

import torch
from prefect import task

from quantflow.storage.artifacts import begin_outputs, finish_outputs, load_tokenizer
from quantflow.config import CalibrationConfig
from quantflow.errors import StageError
from quantflow.storage.manifests import CalibrationManifest, CheckpointManifest
from quantflow.profiling import measure
from quantflow.storage.hashing import digest_of
from quantflow.storage.store import ArtifactStore
from quantflow.tasks.policy import stage_task_options
from quantflow.textdata import load_conversations, load_documents
from quantflow.progress import report, stage_progress
from quantflow.versions import tool_versions

log = logging.getLogger("quantflow.calibration")
STAGE = "calibration"
FIELD = "calibration.source"


def token_stream(docs: list[str], tokenizer, needed: int, seed: int) -> list[int]:
    """Documents in seeded random order, tokenized and joined by EOS, until `needed`
    tokens (at least twice the sample budget, so windows rarely overlap) or no more text."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    sep = tokenizer.eos_token_id
    stream: list[int] = []
    for i in order:
        stream.extend(tokenizer(docs[i], add_special_tokens=False)["input_ids"])
        if sep is not None:
            stream.append(sep)
        report("tokenizing", min(len(stream), needed), needed, f"tokenized {len(stream)} of {needed} tokens")
        if len(stream) >= needed:
            break
    return stream


def sample_windows(stream: list[int], num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    if len(stream) < seq_len:
        raise StageError(STAGE, f"{FIELD}: the text yields only {len(stream)} tokens, fewer than "
                         f"one sample of calibration.seq_len={seq_len}",
                         "use more calibration text or a smaller calibration.seq_len")
    gen = torch.Generator().manual_seed(seed)
    positions = len(stream) - seq_len + 1
    if positions >= num_samples:  # distinct windows whenever the text allows it
        starts = torch.randperm(positions, generator=gen)[:num_samples].tolist()
    else:
        starts = torch.randint(0, positions, (num_samples,), generator=gen).tolist()
    data = torch.tensor(stream, dtype=torch.long)
    return torch.stack([data[s:s + seq_len] for s in starts])


def check_samples(ids: torch.Tensor, cfg: CalibrationConfig, vocab_size: int) -> tuple[dict, list[str]]:
    """Shape and id range are errors; low diversity is a warning (it still calibrates)."""
    if tuple(ids.shape) != (cfg.num_samples, cfg.seq_len):
        raise StageError(STAGE, f"calibration tensor has shape {tuple(ids.shape)}, expected "
                         f"({cfg.num_samples}, {cfg.seq_len})")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise StageError(STAGE, f"token ids span [{lo}, {hi}] but the model's vocabulary has "
                         f"{vocab_size} entries: tokenizer and model do not match",
                         "use the tokenizer that ships with the checkpoint")
    unique = int(torch.unique(ids).numel())
    ratio = unique / ids.numel()
    distinct_rows = len({tuple(r) for r in ids.tolist()})
    stats = {"unique_tokens": unique, "unique_token_ratio": round(ratio, 4),
             "vocab_coverage": round(unique / vocab_size, 4), "distinct_samples": distinct_rows,
             "token_id_range": [lo, hi]}
    warnings = []
    if ratio < cfg.min_unique_token_ratio:
        warnings.append(f"low diversity: only {ratio:.2%} of calibration tokens are distinct "
                        f"(threshold {cfg.min_unique_token_ratio:.2%}); the quantizer sees "
                        "one kind of text")
    if distinct_rows < len(ids):
        warnings.append(f"{len(ids) - distinct_rows} duplicate calibration samples: the text "
                        "is shorter than num_samples x seq_len")
    for w in warnings:
        log.warning("calibration: %s", w)
    return stats, warnings


def chat_documents(calibration: CalibrationConfig, tokenizer) -> list[str]:
    """Conversations rendered with the model's own chat template, special tokens and all, as
    an instruct model sees its inputs (llm-compressor's examples calibrate chat models so)."""
    if not getattr(tokenizer, "chat_template", None):
        raise StageError(STAGE, f"{FIELD}.format is chat, but the model's tokenizer has no chat "
                         "template to render conversations with",
                         f"set {FIELD}.format: text (a base model), or use the instruct model's tokenizer")
    convs = load_conversations(calibration.source, STAGE, FIELD)
    return [tokenizer.apply_chat_template(c, tokenize=False) for c in convs]


def build_calibration(calibration: CalibrationConfig, checkpoint: CheckpointManifest,
                      output_uri: str) -> CalibrationManifest:
    store = ArtifactStore(output_uri)
    begin_outputs(store, STAGE)
    with measure() as usage, stage_progress(STAGE, ["tokenizing"]):
        tokenizer = load_tokenizer(checkpoint)  # stored by stage 1: no checkpoint download
        docs = (chat_documents(calibration, tokenizer) if calibration.source.format == "chat"
                else load_documents(calibration.source, STAGE, FIELD))
        budget = 2 * calibration.num_samples * calibration.seq_len
        stream = token_stream(docs, tokenizer, budget, calibration.seed)
        ids = sample_windows(stream, calibration.num_samples, calibration.seq_len, calibration.seed)
        vocab = checkpoint.architecture.get("vocab_size") or len(tokenizer)
        stats, warnings = check_samples(ids, calibration, vocab)
        stats["stream_tokens"] = len(stream)
        stats["documents"] = len(docs)
        buf = io.BytesIO()
        torch.save({"input_ids": ids}, buf)
        data = buf.getvalue()
        uri = store.write_bytes("calibration_data.pt", data)
        manifest = CalibrationManifest(
            uri=uri, sha256=digest_of(ids.tolist()), num_samples=calibration.num_samples,
            seq_len=calibration.seq_len, source=calibration.source.model_dump(mode="json"),
            stats=stats, warnings=warnings, versions=tool_versions())
        store.write_json("calibration_manifest.json", manifest.model_dump(mode="json", exclude={"usage"}))
    manifest.usage = vars(usage)
    log.info("calibration: %d x %d tokens from %d documents (%.1f%% distinct tokens)",
             calibration.num_samples, calibration.seq_len, len(docs), 100 * stats["unique_token_ratio"])
    return finish_outputs(store, STAGE, manifest)


calibration_task = task(**stage_task_options(STAGE))(build_calibration)
