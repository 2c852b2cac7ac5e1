"""One set of settings per output folder at a time.

Two identical runs share a folder safely: each stage runs under its cache key's lock and the
second reads the first's result (quantflow/storage/locks.py). Two runs with *different* settings in
one folder would not: each would rewrite the stage files and pipeline_summary.json the other
is reading. So a run claims its output folder for its settings' digest before it writes
anything there, and a run whose settings differ from a live claim's is refused.

A claim is `_claims/<host>-<pid>-<nonce>.json` in the folder itself (local or S3), so it
works wherever the artifacts do. Claims are ordered by the time they were written; of two
conflicting claims, the older wins and the newer run stops. A claim outlives a run killed
with -9: it is ignored once its pid is gone on this host, or, from another host, once it is
older than the stage-lock lease (`QUANTFLOW_STAGE_LOCK_LEASE_S`, default 6 h). On a local
folder the write-then-list step holds a flock, so two runs cannot both miss each other; on
S3 the window is the few milliseconds between a run's timestamp and its write.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

from quantflow.errors import QuantflowError
from quantflow.storage.locks import _alive, lease_s
from quantflow.storage.hashing import digest_of
from quantflow.storage.store import ArtifactStore

log = logging.getLogger("quantflow.pipeline")
CLAIMS = "_claims"


class FolderInUse(QuantflowError):
    """Another live run with other settings holds this output folder."""


def settings_digest(config: BaseModel) -> str:
    # The run's name is a label, not a setting: two runs that differ only by name write
    # identical files, and the stage locks already keep them from computing twice.
    data = config.model_dump(mode="json", exclude={"name"})
    return digest_of({"kind": type(config).__name__, "settings": data})


def _live(claim: dict[str, Any]) -> bool:
    if claim.get("host") == socket.gethostname():
        return _alive(int(claim.get("pid", 0)))
    return time.time() - float(claim.get("time", 0)) < lease_s()


@contextmanager
def _listing_lock(store: ArtifactStore) -> Iterator[None]:
    if store.remote:
        yield
        return
    folder = Path(store.root) / CLAIMS
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "claims.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _claims(store: ArtifactStore) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    if not store.exists(CLAIMS):
        return found
    for path in store.fs.ls(store._path(CLAIMS), detail=False):
        name = str(path).rstrip("/").rsplit("/", 1)[-1]
        if not name.endswith(".json"):
            continue
        try:
            found[name] = store.read_json(f"{CLAIMS}/{name}")
        except (FileNotFoundError, ValueError):
            continue  # released or being written meanwhile
    return found


@contextmanager
def claim_output(config: BaseModel, output_uri: str) -> Iterator[None]:
    """Hold `output_uri` for this run's settings; raise FolderInUse if a live run with other
    settings holds it. Released when the run ends, whatever its outcome."""
    store = ArtifactStore(output_uri)
    mine = {"digest": settings_digest(config), "run": getattr(config, "name", "?"),
            "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    own = f"{mine['host']}-{mine['pid']}-{secrets.token_hex(4)}.json"
    with _listing_lock(store):
        store.write_json(f"{CLAIMS}/{own}", mine)
        others = {k: v for k, v in _claims(store).items() if k != own}
    for name, claim in others.items():
        if not _live(claim) and claim.get("host") == socket.gethostname():
            store.delete(f"{CLAIMS}/{name}")  # its run was killed; nothing holds the folder
    rivals = sorted((c["time"], n, c) for n, c in others.items()
                    if _live(c) and c.get("digest") != mine["digest"] and (c["time"], n) < (mine["time"], own))
    if rivals:
        store.delete(f"{CLAIMS}/{own}")
        _, _, holder = rivals[0]
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["time"]))
        raise FolderInUse(
            f"output_dir {output_uri} is in use by run '{holder.get('run')}' (pid {holder.get('pid')} "
            f"on {holder.get('host')}, started {started}) with other settings; two runs with "
            "different settings in one folder would overwrite each other's stage files.\n"
            "  fix: wait for that run to finish, or give this run its own output_dir")
    try:
        yield
    finally:
        try:
            store.delete(f"{CLAIMS}/{own}")
        except OSError as err:  # a store that went away must not mask the run's own outcome
            log.warning("could not release the claim on %s: %s", output_uri, err)
