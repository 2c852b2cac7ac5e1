"""Read stage outputs back from the artifact store, verifying them against their manifests.

One home for this so that no stage imports another stage's module.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from quantflow.errors import StageError
from quantflow.storage.content_digest import DigestMemo
from quantflow.storage.hashing import digest_of, tree_sha256
from quantflow.storage.manifests import CalibrationManifest, CheckpointManifest, QuantizedManifest
from quantflow.storage.store import ArtifactStore, read_uri


def baseline_metrics_digest(metrics: dict) -> str:
    """Digest of stage 1's measurements as baseline_metrics.json holds them (JSON types,
    string keys), golden answers left out (they are not compared against): stage 1 records
    it in its manifest, validate recomputes it from the file to refuse one edited since."""
    return digest_of(json.loads(json.dumps({k: v for k, v in metrics.items() if k != "golden"}, default=str)))


def load_calibration(manifest: CalibrationManifest, stage: str) -> torch.Tensor:
    ids = torch.load(io.BytesIO(read_uri(manifest.uri)))["input_ids"]
    if digest_of(ids.tolist()) != manifest.sha256:
        raise StageError(stage, f"{manifest.uri} does not match its manifest (changed on disk)",
                         "re-run the pipeline; the calibration stage rebuilds it")
    return ids


def split_uri(uri: str) -> tuple[ArtifactStore, str]:
    """(store of the parent folder, name) for a folder URI."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    return ArtifactStore(parent or "."), name


def fetch_quantized(manifest: QuantizedManifest, stage: str) -> tuple[Path, str]:
    """Local folder of the quantized checkpoint, with every file's sha256 re-checked, and
    the digest of the files found (what a validation report must name). On S3, a worker's
    earlier copy is reused only while the objects' sizes and ETags are unchanged
    (store.fetch_dir); a changed object is downloaded again and refused here."""
    store, name = split_uri(manifest.uri)
    if not store.exists(name):
        raise StageError(stage, f"quantized checkpoint {manifest.uri} is missing",
                         "re-run the pipeline; the quantize stage rebuilds it")
    local = store.fetch_dir(name, expected=manifest.files)
    memo = DigestMemo()  # an untouched file costs a stat; a changed one is hashed again
    found = tree_sha256(local, memo)
    memo.save()
    if found != manifest.files:
        changed = sorted(set(found.items()) ^ set(manifest.files.items()))
        raise StageError(stage, f"quantized checkpoint {manifest.uri} differs from what the "
                         f"quantize stage wrote ({', '.join(sorted({c[0] for c in changed})[:5])})",
                         "re-run the pipeline from the quantize stage (delete the folder)")
    return local, digest_of(found)


def read_json_uri(uri: str) -> dict:
    return json.loads(read_uri(uri))


def marker(stage: str) -> str:
    """The file that says which manifest a stage's outputs in a folder belong to."""
    return f"_manifests/{stage}.json"


def begin_outputs(store: ArtifactStore, stage: str) -> None:
    """Forget which manifest the folder's outputs belonged to before rewriting them, so a
    write interrupted halfway is never mistaken for a complete earlier result."""
    store.delete(marker(stage))


# Outputs whose content a cache hit re-checks against the signature the marker recorded:
# those no later stage verifies when it is itself a cache hit. A changed one makes its stage
# recompute (flows/stages.run_stage_task), naming the file. The quantized checkpoint is
# verified by fetch_quantized (validate, deploy) and the baseline by validate; a rerun
# whose every stage is a cache hit reads neither.
CONTENT_CHECKED: dict[str, tuple[str, ...]] = {"calibration": ("calibration_data.pt",)}


def record_outputs(store: ArtifactStore, stage: str, manifest) -> None:
    files = {rel: store.signature(rel) for rel in CONTENT_CHECKED.get(stage, ())}
    store.write_json(marker(stage), {"key": manifest.outputs_key(), "files": files})


def finish_outputs(store: ArtifactStore, stage: str, manifest):
    """The stage's last step, inside its task: the marker is written before the result is
    committed and the stage lock released, so a run that waited on the lock finds it."""
    record_outputs(store, stage, manifest)
    return manifest


def changed_outputs(store: ArtifactStore, stage: str, manifest) -> list[str]:
    """Why a cached manifest no longer describes the folder (empty when it does): another
    run with other settings rewrote the outputs (same output_dir), or a file the marker
    holds a signature of was changed since. Costs a stat (local) or a HEAD (S3) per file."""
    try:
        doc = store.read_json(marker(stage))
        if doc["key"] != manifest.outputs_key():
            return [f"{marker(stage)} names other outputs"]
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        return [f"{marker(stage)} is missing or unreadable"]
    changed = []
    for rel, recorded in (doc.get("files") or {}).items():
        try:
            now = store.signature(rel)
        except FileNotFoundError:
            now = None
        if now != recorded:
            changed.append(f"{store.uri(rel)} changed since the {stage} stage wrote it")
    return changed


TOKENIZER = "tokenizer"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def save_tokenizer(store: ArtifactStore, model_dir: Path) -> str:
    """Stage 1 stores the tokenizer (every small non-weight file) beside its outputs, so a
    stage that needs only the tokenizer never downloads the checkpoint."""
    files = [p for p in model_dir.iterdir() if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES)
             and p.name != "model.safetensors.index.json" and p.stat().st_size < 64 * 2**20]
    for p in files:
        store.write_bytes(f"{TOKENIZER}/{p.name}", p.read_bytes())
    return store.uri(TOKENIZER)


def load_tokenizer(manifest: CheckpointManifest):
    from transformers import AutoTokenizer

    store, name = split_uri(manifest.tokenizer_uri)
    return AutoTokenizer.from_pretrained(store.fetch_dir(name),
                                         trust_remote_code=manifest.model.trust_remote_code)


def local_checkpoint(manifest: CheckpointManifest, stage: str) -> Path:
    """The baseline checkpoint on this machine, holding exactly the shards stage 1 verified.
    A stage on another worker resolves it again (hub cache or the same path). Every shard is
    checked against stage 1's sha256: through the content-digest memo, a file whose size,
    mtime, ctime and inode are unchanged costs a stat, and a changed one is read again, so
    a checkpoint edited on a shared filesystem after stage 1 is noticed, not quantized."""
    from quantflow.storage.checkpoints import resolve_model

    path = Path(manifest.local_path)
    if not path.is_dir():
        path = resolve_model(manifest.model)
    memo = DigestMemo()
    missing = [name for name in manifest.shards if not (path / name).is_file()]
    changed = [name for name, sha in manifest.shards.items()
               if name not in missing and memo.file_digest(path / name) != sha]
    memo.save()
    if missing or changed:
        what = "; ".join(part for part in (f"changed: {', '.join(changed)}" if changed else "",
                                           f"missing: {', '.join(missing)}" if missing else "") if part)
        raise StageError(stage, f"the checkpoint at {path} differs from the one stage 1 verified "
                         f"({what})", "re-run the pipeline so stage 1 verifies and measures the "
                         "checkpoint as it is now, or restore the original files; on the hub, pin "
                         "model.revision so every worker reads the same files")
    return path
