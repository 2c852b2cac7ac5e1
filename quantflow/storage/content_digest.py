"""sha256 of local inputs (data sets, lm-eval task folders, recipes) for cache keys.

A path says where an input lives, not what it holds: keyed by path, an edited data set
keeps its old cached results and the verdict is silently wrong. Hashing by content costs a
read of every byte, so each file's digest is remembered in a small JSON memo under
$QUANTFLOW_CACHE, keyed by the file's absolute path and checked against its size, mtime,
ctime and inode; a file is read again only when one of those changed.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import yaml

from quantflow.storage.hashing import cache_root, digest_of, file_sha256

MEMO_NAME = "content_digests.json"
MEMO_MAX_ENTRIES = 50_000  # those hashed longest ago go first; a dropped one costs a re-hash
# A file whose mtime is this recent may still be written to within the same timestamp tick
# (same size, same mtime, new bytes); its digest is used but not remembered ("racy git").
RACY_WINDOW_NS = 2_000_000_000
# Derived files that tools write into task folders while running (lm-eval imports a task
# folder's utils.py): hashing them would change the key between a first run and its rerun.
IGNORED_DIRS = {"__pycache__", ".git", ".ipynb_checkpoints"}
IGNORED_SUFFIXES = (".pyc",)


def memo_path() -> Path:
    return cache_root() / MEMO_NAME


def _signature(st: os.stat_result) -> list[int]:
    # ctime too: tools that restore mtime (cp -p, rsync -t, tar) cannot restore ctime.
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class DigestMemo:
    """Per-file digests, loaded once per key computation and written back if they grew.

    Writes are atomic renames; two processes updating it at once may lose each other's
    new entries, which costs a re-hash later and never a wrong digest (each entry is
    checked against the file's current stat before use).
    """

    def __init__(self, path: Path | None = None):
        self.path = path or memo_path()
        self.entries: dict[str, dict] = {}
        self.dirty = False
        try:
            loaded = json.loads(self.path.read_text())
            if isinstance(loaded, dict):
                self.entries = {k: v for k, v in loaded.items()
                                if isinstance(v, dict) and isinstance(v.get("sha256"), str)}
        except (OSError, ValueError):
            pass  # no memo yet, or a damaged one: start over

    def file_digest(self, path: Path) -> str:
        path = Path(os.path.abspath(path))
        st = path.stat()
        sig = _signature(st)
        key = str(path)
        entry = self.entries.get(key)
        if entry is not None and entry.get("stat") == sig:
            return entry["sha256"]
        digest = file_sha256(path)  # streamed in chunks: a multi-GB file never sits in memory
        self.entries.pop(key, None)
        if time.time_ns() - st.st_mtime_ns > RACY_WINDOW_NS:
            self.entries[key] = {"stat": sig, "sha256": digest}
            self.dirty = True
        return digest

    def save(self) -> None:
        if not self.dirty:
            return
        keep = dict(list(self.entries.items())[-MEMO_MAX_ENTRIES:])
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
            with os.fdopen(fd, "w") as f:
                json.dump(keep, f)
            os.replace(tmp, self.path)
            self.dirty = False
        except OSError:  # a read-only or full cache folder makes keys slower, not wrong
            if tmp:
                Path(tmp).unlink(missing_ok=True)


def _tree_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_DIRS)
        files += [Path(dirpath) / n for n in sorted(filenames) if not n.endswith(IGNORED_SUFFIXES)]
    return [f for f in files if f.is_file()]  # a dangling symlink is read by nobody


def path_digest(path: str | Path, memo: DigestMemo | None = None) -> str | None:
    """Digest of a local file, or of a folder as sorted (relative path, file digest) pairs;
    None when nothing exists there."""
    p = Path(path).expanduser()
    own = memo is None
    memo = memo or DigestMemo()
    try:
        if p.is_file():
            return memo.file_digest(p)
        if p.is_dir():
            return digest_of([(f.relative_to(p).as_posix(), memo.file_digest(f))
                              for f in _tree_files(p)])
        return None
    finally:
        if own:
            memo.save()


class _TaskYamlLoader(yaml.SafeLoader):
    """lm-eval task YAMLs use tags like `!function utils.doc_to_text`; read them as text."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: (
    loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode) else None))


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def task_data_paths(include_path: Path) -> dict[str, Path]:
    """Local files the task YAMLs under include_path load (dataset_path, and data_files in
    dataset_kwargs) but that may live outside the folder, by the path as written. lm-eval
    hands these to datasets.load_dataset, which resolves relative paths against the working
    directory."""
    found: dict[str, Path] = {}
    for f in _tree_files(include_path):
        if f.suffix not in (".yaml", ".yml"):
            continue
        try:
            doc = yaml.load(f.read_text(), Loader=_TaskYamlLoader)  # noqa: S506 - safe subclass
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # the file's bytes are hashed with the folder regardless
        if not isinstance(doc, dict):
            continue
        for s in _strings([doc.get("dataset_path"), doc.get("dataset_kwargs")]):
            p = Path(s).expanduser()
            if s and (p.is_file() or p.is_dir()):
                found[s] = p
    return dict(sorted(found.items()))


def task_folder_digest(include_path: str | Path, memo: DigestMemo | None = None) -> str | None:
    """An lm-eval task folder: every file under it, plus the data files its YAMLs name."""
    root = Path(include_path).expanduser()
    if not root.is_dir():
        return path_digest(root, memo)
    own = memo is None
    memo = memo or DigestMemo()
    try:
        return digest_of({"folder": path_digest(root, memo),
                          "data": [(s, path_digest(p, memo)) for s, p in task_data_paths(root).items()]})
    finally:
        if own:
            memo.save()
