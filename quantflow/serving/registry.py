"""Which server is live for each deployment name (the rollout's source of truth).

Kept as one JSON file per deployment under the state folder ($QUANTFLOW_STATE_DIR,
default ./.quantflow), written atomically under a file lock so two rollouts of the same
name cannot interleave.

A server being started is recorded under "starting" before it is launched, with a random
tag that the server carries in its environment. A rollout holds the lock from that entry
until `activate`, so an entry seen by anyone else holding the lock was abandoned: its
rollout was killed (kill -9, OOM) while vLLM started. `reap_starting` stops whatever carries
the tag; the next deploy of that name, `stop_all` and `quantflow stop` call it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from quantflow.processes import start_time, stop_tagged
from quantflow.storage.store import ArtifactStore

log = logging.getLogger("quantflow.deploy")
# The environment variable that tags a server with its "starting" entry.
SERVER_TAG_ENV = "QUANTFLOW_SERVER_TAG"


def state_dir() -> Path:
    return Path(os.environ.get("QUANTFLOW_STATE_DIR", ".quantflow")).resolve()


class DeploymentRegistry:
    def __init__(self, root: Path | None = None):
        self.root = (root or state_dir()) / "deployments"
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = ArtifactStore(str(self.root))

    def read(self, name: str) -> dict:
        if not self.store.exists(f"{name}.json"):
            return {"name": name, "active": None, "history": []}
        return self.store.read_json(f"{name}.json")

    def active(self, name: str) -> dict | None:
        return self.read(name)["active"]

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.json"))

    def write(self, name: str, doc: dict) -> None:
        self.store.write_json(f"{name}.json", doc)

    @contextmanager
    def locked(self, name: str) -> Iterator[None]:
        with open(self.root / f".{name}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def begin_start(self, name: str, spec: Any) -> str:
        """Record that this process is about to start the server `spec` describes (a
        ServerSpec), under the lock, before launching it: tags the server's environment and
        returns the tag."""
        tag = uuid.uuid4().hex
        spec.env[SERVER_TAG_ENV] = tag
        doc = self.read(name)
        doc["starting"] = [*doc.get("starting", []), {
            "tag": tag, "port": spec.port, "log_path": spec.log_path, "owner_pid": os.getpid(),
            "owner_create_time": start_time(os.getpid()),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}]
        self.write(name, doc)
        return tag

    def reap_starting(self, name: str) -> list[dict]:
        """Stop servers whose rollout died while they started (call under `locked(name)`);
        returns their entries. Nothing else holds the lock during a start, so every entry
        found here is abandoned."""
        doc = self.read(name)
        entries = doc.get("starting", [])
        for entry in entries:
            pids = stop_tagged(SERVER_TAG_ENV, entry["tag"])
            if pids:
                log.warning("deploy: stopped a %s server on port %s (pids %s) that a rollout started "
                            "but never recorded: its owner (pid %s) died while it started", name,
                            entry["port"], pids, entry["owner_pid"])
        if entries:
            doc["starting"] = []
            self.write(name, doc)
        return entries

    def activate(self, name: str, record: dict) -> dict | None:
        """Make `record` active; returns the record it replaced (to be stopped)."""
        doc = self.read(name)
        tag = record.get("env", {}).get(SERVER_TAG_ENV)
        doc["starting"] = [e for e in doc.get("starting", []) if e["tag"] != tag]
        previous = doc["active"]
        if previous:
            doc["history"] = ([previous] + doc["history"])[:10]
        # Counted per name across restarts of the registry: 1 for the first release.
        doc["revisions"] = doc.get("revisions", len(doc["history"])) + 1
        record["revision"] = doc["revisions"]
        doc["active"] = record
        self.write(name, doc)
        return previous

    def stop(self, name: str) -> dict | None:
        """Stop one deployment's local server and its nginx; returns its record (None when
        no local server of that name is live). Others are left serving."""
        from quantflow.serving.process import stop_record

        if name not in self.names():
            return None
        with self.locked(name):  # not while a rollout of the same name is switching
            self.reap_starting(name)
            record = self.active(name)
            if not record or record.get("backend", "local") != "local":
                return None
            stop_record(record)
            self.clear(name)
            return record

    def stop_all(self) -> list[dict]:
        """Stop every active local server recorded here; returns their records."""
        return [record for name in self.names() if (record := self.stop(name)) is not None]

    def clear(self, name: str) -> None:
        doc = self.read(name)
        if doc["active"]:
            doc["history"] = ([doc["active"]] + doc["history"])[:10]
        doc["active"] = None
        self.write(name, doc)
