"""Find a checkpoint (local folder or hub id) and check that its files are whole.

Shared by every stage that loads a model; holds no stage logic.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from quantflow.config import ModelSpec
from quantflow.errors import StageError, TransientError
from quantflow.storage.hashing import digest_of

STAGE = "checkpoint"


def looks_like_path(model_id: str) -> bool:
    return (model_id.startswith(("/", "./", "../", "~")) or model_id.count("/") > 1
            or os.sep != "/" and os.sep in model_id)


def resolve_model(spec: ModelSpec) -> Path:
    """The local folder holding the checkpoint, downloading from the hub when needed."""
    local = Path(spec.id).expanduser()
    if local.exists():
        if not local.is_dir():
            raise StageError(STAGE, f"model path {local} is a file, not a checkpoint folder",
                             "pass the folder that holds config.json and the *.safetensors shards")
        return local.resolve()
    if looks_like_path(spec.id):
        raise StageError(STAGE, f"model path {spec.id} does not exist",
                         "pass an existing local folder or a Hugging Face hub id like org/name")
    return _download(spec)


def _download(spec: ModelSpec) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        return Path(snapshot_download(
            spec.id, revision=spec.revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"]))
    except GatedRepoError:
        raise StageError(STAGE, f"model {spec.id} is gated on the Hugging Face hub",
                         "accept its licence on the hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise StageError(STAGE, f"model {spec.id} was not found on the Hugging Face hub "
                         "(and no local folder has that name)",
                         "check the spelling, or pass a local checkpoint folder") from None
    except RevisionNotFoundError:
        raise StageError(STAGE, f"revision {spec.revision!r} of {spec.id} does not exist",
                         "pass a commit sha, branch or tag that exists") from None
    except LocalEntryNotFoundError:
        # Raised offline (HF_HUB_OFFLINE=1) or when the hub is unreachable and nothing is cached.
        if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
            raise StageError(STAGE, f"model {spec.id} is not a local folder and is not in the "
                             "hub cache, and HF_HUB_OFFLINE is set",
                             "pass a local checkpoint folder, or unset HF_HUB_OFFLINE") from None
        raise TransientError(STAGE, f"could not reach the Hugging Face hub to fetch {spec.id}") from None


def cheap_fingerprint(spec: ModelSpec) -> str:
    """Changes whenever the checkpoint changes, without hashing gigabytes.

    Local folders: file names, sizes and modification times. Hub ids: the commit the
    revision points at (offline: the revision as given).
    """
    local = Path(spec.id).expanduser()
    if local.is_dir():
        stats = [(p.relative_to(local).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                 for p in sorted(local.rglob("*")) if p.is_file()]
        return digest_of(stats)
    if looks_like_path(spec.id):
        return digest_of(["missing", spec.id])
    return digest_of(["hub", spec.id, hub_commit(spec)])


def hub_commit(spec: ModelSpec) -> str:
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return spec.revision or "unknown"
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(spec.id, revision=spec.revision).sha or "unknown"
    except Exception:  # noqa: BLE001 - unreachable hub: fall back to the revision as given
        return spec.revision or "unknown"


def read_safetensors_header(path: Path) -> dict:
    """Parse and bounds-check a safetensors header; a short or garbled file is an error."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise StageError(STAGE, f"shard {path.name} is truncated ({size} bytes): no header",
                             "re-download or re-save the checkpoint")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 * 2**20):
            raise StageError(STAGE, f"shard {path.name} is corrupt: header length {n} does not fit "
                             f"a {size}-byte file", "re-download or re-save the checkpoint")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise StageError(STAGE, f"shard {path.name} is corrupt: its header is not valid JSON",
                             "re-download or re-save the checkpoint") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise StageError(STAGE, f"shard {path.name} is truncated or padded: its header describes "
                         f"{8 + n + end} bytes, the file has {size}",
                         "re-download or re-save the checkpoint")
    return header


def shard_files(folder: Path) -> list[Path]:
    """The checkpoint's shards: those its index names, when there is an index (some repos
    also ship a consolidated copy of the same weights, which must not count twice)."""
    shards = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            named = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError):
            raise StageError(STAGE, f"{index.name} is not a valid safetensors index",
                             "re-download the checkpoint") from None
        missing = sorted(n for n in named if not (folder / n).exists())
        if missing:
            raise StageError(STAGE, f"shards listed in {index.name} are missing: {', '.join(missing)}",
                             "re-download the checkpoint")
        shards = sorted(folder / n for n in named)
    if not shards:
        raise StageError(STAGE, f"no *.safetensors shards in {folder}",
                         "quantflow reads safetensors checkpoints; convert .bin weights with "
                         "transformers' save_pretrained(safe_serialization=True)")
    return shards


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise StageError(STAGE, f"{folder} has no config.json", "pass a Hugging Face checkpoint folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StageError(STAGE, f"{path} is not valid JSON ({err})", "repair or re-download it") from None


def model_config_of(spec: ModelSpec) -> dict | None:
    """The model's config.json before any stage runs: read from a local folder, or fetched
    alone from the hub (a few KB). None when it cannot be had yet; the stages check again."""
    local = Path(spec.id).expanduser()
    if local.is_dir():
        try:
            return read_config(local)
        except StageError:
            return None
    if looks_like_path(spec.id):
        return None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(spec.id, "config.json", revision=spec.revision)).read_text())
    except Exception:  # noqa: BLE001 - offline, gated, or no such repo: stage 1 says which
        return None
