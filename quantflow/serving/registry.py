"""Which server is live for each deployment name (the rollout's source of truth).

Kept as one JSON file per deployment under the state folder ($QUANTFLOW_STATE_DIR,
default ./.quantflow), written atomically under a file lock so two rollouts of the same
name cannot interleave.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from quantflow.store import ArtifactStore


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

    def activate(self, name: str, record: dict) -> dict | None:
        """Make `record` active; returns the record it replaced (to be stopped)."""
        doc = self.read(name)
        previous = doc["active"]
        if previous:
            doc["history"] = ([previous] + doc["history"])[:10]
        doc["active"] = record
        self.write(name, doc)
        return previous

    def stop_all(self) -> list[dict]:
        """Stop every active local server recorded here; returns their records."""
        from quantflow.serving.process import stop_record

        stopped = []
        for name in self.names():
            with self.locked(name):  # not while a rollout of the same name is switching
                record = self.active(name)
                if record and record.get("backend", "local") == "local":
                    stop_record(record)
                    self.clear(name)
                    stopped.append(record)
        return stopped

    def clear(self, name: str) -> None:
        doc = self.read(name)
        if doc["active"]:
            doc["history"] = ([doc["active"]] + doc["history"])[:10]
        doc["active"] = None
        self.write(name, doc)
