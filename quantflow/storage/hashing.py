"""Content hashes and the local cache root: the lowest layer of storage, which the store,
the content-digest memo and the cache keys all build on."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

CHUNK = 8 * 1024 * 1024


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


CARD_FILE = "README.md"


def tree_sha256(local_dir: str | Path, memo: Any = None) -> dict[str, str]:
    """sha256 of every file under a folder, keyed by relative POSIX path. The top-level
    README.md (the model card validate writes later) is left out: it is bound by the
    validate manifest's card_sha256 instead. With a content_digest.DigestMemo, a file whose
    size, mtime, ctime and inode are unchanged since it was last hashed costs a stat."""
    root = Path(local_dir)
    digest = memo.file_digest if memo is not None else file_sha256
    return {p.relative_to(root).as_posix(): digest(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root).as_posix() != CARD_FILE}


def cache_root() -> Path:
    """This machine's cache of derived files ($QUANTFLOW_CACHE, default ~/.cache/quantflow)."""
    return Path(os.environ.get("QUANTFLOW_CACHE", Path.home() / ".cache" / "quantflow"))


def digest_of(obj: Any) -> str:
    """Stable sha256 of JSON-able data (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
