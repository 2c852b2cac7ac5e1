"""Errors a user can act on: what happened, why, and the fix."""

from __future__ import annotations


class QuantflowError(Exception):
    """Base: `str(err)` is a complete message for a person."""


class ConfigError(QuantflowError):
    """Invalid configuration; raised before any model is loaded."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration in {source}:\n{lines}")


class StageError(QuantflowError):
    """A stage failed for a reason that retrying will not fix."""

    def __init__(self, stage: str, cause: str, fix: str | None = None):
        self.stage = stage
        self.cause = cause
        self.fix = fix
        super().__init__(f"[{stage}] {cause}" + (f"\n  fix: {fix}" if fix else ""))


class TransientError(QuantflowError):
    """A fault worth retrying: network, hub, storage or a server that was not ready yet."""

    def __init__(self, stage: str, cause: str):
        self.stage = stage
        super().__init__(f"[{stage}] {cause}")


class InputError(QuantflowError):
    """A bad input found by the pre-flight, before any stage ran: names the setting (or
    file), why it cannot work, and the fix."""

    def __init__(self, field: str, problem: str, fix: str):
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}: {problem}\n  fix: {fix}")


class DiskFullError(QuantflowError):
    """A write found no space left on its disk. Not transient: retrying fills the same disk."""

    def __init__(self, path: str):
        self.path = path
        self.problem = f"no space left on the disk while writing {path}; nothing partial was kept"
        super().__init__(f"{self.problem}\n  fix: free space on that disk, or set output_dir to a "
                         "folder on a disk with room")


class StorageRefusedError(QuantflowError):
    """The object store refused a write these credentials may not make (403). Not
    transient: the same credentials are refused again."""

    def __init__(self, uri: str, reason: str):
        self.uri = uri
        super().__init__(f"the object store refused writing {uri}: {reason}\n  fix: give the credentials "
                         "(AWS_ACCESS_KEY_ID, or the instance's role) s3:PutObject on that prefix, or set "
                         "output_dir to a prefix they may write")
