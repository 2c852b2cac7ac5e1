"""Stage 1: find the checkpoint, prove its files are whole, describe it, measure the baseline."""

from __future__ import annotations

import logging
from math import prod
from pathlib import Path

from prefect import task

from quantflow.storage.artifacts import baseline_metrics_digest, begin_outputs, finish_outputs, save_tokenizer
from quantflow.storage.checkpoints import read_config, read_safetensors_header, resolve_model, shard_files
from quantflow.config import CompletionCheck, DeployConfig, ModelSpec, ValidationConfig
from quantflow.storage.content_digest import DigestMemo
from quantflow.errors import StageError
from quantflow.evaluation.suite import evaluate_model, evaluation_phases
from quantflow.storage.manifests import CheckpointManifest
from quantflow.profiling import measure
from quantflow.progress import report, stage_progress
from quantflow.storage.hashing import digest_of
from quantflow.storage.store import ArtifactStore
from quantflow.tasks.policy import stage_task_options
from quantflow.versions import tool_versions

log = logging.getLogger("quantflow.checkpoint")
STAGE = "checkpoint"


def architecture(config: dict, headers: dict[str, dict], shards: list[Path]) -> dict:
    params = 0
    dtypes: dict[str, int] = {}
    for header in headers.values():
        for name, t in header.items():
            if name == "__metadata__":
                continue
            n = prod(t["shape"]) if t["shape"] else 1
            params += n
            dtypes[t["dtype"]] = dtypes.get(t["dtype"], 0) + n
    text = config.get("text_config", config)
    return {
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "params": params,
        "size_bytes": sum(s.stat().st_size for s in shards),
        "tensor_dtypes": dtypes,
        "layers": text.get("num_hidden_layers"),
        "hidden_size": text.get("hidden_size"),
        "attention_heads": text.get("num_attention_heads"),
        "kv_heads": text.get("num_key_value_heads", text.get("num_attention_heads")),
        "vocab_size": text.get("vocab_size"),
        "max_positions": text.get("max_position_embeddings"),
        "tie_word_embeddings": config.get("tie_word_embeddings"),
    }


def prepare_checkpoint(model: ModelSpec, validation: ValidationConfig, output_uri: str,
                       serving: DeployConfig | None = None,
                       golden_prompts: list[CompletionCheck] | None = None) -> CheckpointManifest:
    """`golden_prompts`: the health-check and probe prompts whose baseline answers are
    recorded (the golden set), so no expected answer is tied to one machine's arithmetic."""
    store = ArtifactStore(output_uri)
    # Dispatched stages get their parameters back as JSON.
    golden_prompts = [CompletionCheck.model_validate(c) for c in golden_prompts or []]
    begin_outputs(store, STAGE)
    with measure() as usage, stage_progress(STAGE, ["hashing", *evaluation_phases(validation)]):
        path = resolve_model(model)
        config = read_config(path)
        shards = shard_files(path)
        headers = {s.name: read_safetensors_header(s) for s in shards}
        log.info("checkpoint %s: hashing %d shard(s)", path, len(shards))
        # Through the digest memo, so the later stages' check of these shards
        # (artifacts.local_checkpoint) costs a stat while the files are unchanged.
        memo = DigestMemo()
        hashes = {}
        for i, shard in enumerate(shards):
            hashes[shard.name] = memo.file_digest(shard)
            report("hashing", i + 1, len(shards), f"hashed shard {i + 1} of {len(shards)}")
        memo.save()
        arch = architecture(config, headers, shards)
        if arch["params"] == 0:
            raise StageError(STAGE, f"{path} holds no tensors", "re-download or re-save the checkpoint")
        log.info("checkpoint: %s, %.1fM params, %d layers, %.1f MB", arch["model_type"],
                 arch["params"] / 1e6, arch["layers"] or 0, arch["size_bytes"] / 1e6)
        baseline = evaluate_model(path, validation, store, "baseline", STAGE, serving,
                                  trust_remote_code=model.trust_remote_code,
                                  golden_prompts=golden_prompts)
        ppl = baseline.get("perplexity", {}).get("perplexity")
        if ppl is not None and not (ppl == ppl and ppl < float("inf")):
            raise StageError(STAGE, f"baseline perplexity is {ppl}: the weights produce no "
                             "usable predictions (corrupt or untrained checkpoint?)",
                             "check the checkpoint files")
        prequantized = "quantization_config" in config
        doc = {"model": model.model_dump(mode="json"), "local_path": str(path),
               "architecture": arch, "shards": hashes, "metrics": baseline,
               "validation_config": validation.model_dump(mode="json"), "versions": tool_versions()}
        baseline_uri = store.write_json("baseline_metrics.json", doc)
        tokenizer_uri = save_tokenizer(store, path)
    return finish_outputs(store, STAGE, CheckpointManifest(
        model=model, local_path=str(path), shards=hashes,
        fingerprint=digest_of({"shards": hashes, "config": config}), architecture=arch,
        baseline_uri=baseline_uri, tokenizer_uri=tokenizer_uri, logprobs_uri=baseline.get("logprobs", {}).get("uri"),
        prequantized=prequantized, versions=tool_versions(), usage=vars(usage),
        golden=baseline.get("golden", []),
        baseline_digest=baseline_metrics_digest(baseline)))


checkpoint_task = task(**stage_task_options(STAGE))(prepare_checkpoint)
