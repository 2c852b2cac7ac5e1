"""The artifact store: a local folder or s3://bucket/prefix, written atomically.

Large outputs (checkpoints, calibration tensors, reports) live here; Prefect results only
carry small manifests that point into it. Local writes go to a temporary name and are
renamed into place. Object stores have no rename, so a stage writes its files first and its
manifest last: a folder without a manifest is incomplete and is overwritten by the next try.
Credentials for S3 come from the environment (AWS_* variables, AWS_ENDPOINT_URL) and never
appear in config, parameters or logs.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import fsspec

from quantflow.errors import DiskFullError, StorageRefusedError
from quantflow.storage.content_digest import DigestMemo
from quantflow.storage.hashing import cache_root, digest_of


def read_uri(uri: str) -> bytes:
    with fsspec.open(uri, "rb") as f:
        return f.read()


def is_transient_storage_fault(exc: BaseException | None) -> bool:
    """An object store fault worth retrying: the store answered 5xx or 429 (503 SlowDown,
    500 InternalError) or the connection failed. s3fs re-raises these as OSError with the
    botocore error as its cause, so the chain is searched. 4xx answers (bad credentials,
    a missing bucket or key) are not transient: retrying cannot fix them."""
    try:
        from botocore import exceptions as boto
    except ImportError:  # no S3 support installed: no S3 faults either
        return False
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (boto.HTTPClientError, boto.ConnectionError)):
            return True  # connection reset, closed, refused, timed out
        if isinstance(exc, boto.ClientError):
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return isinstance(status, int) and (status >= 500 or status == 429)
        exc = exc.__cause__ or exc.__context__
    return False


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC/EDQUOT, also as libraries that do not raise OSError report it (safetensors'
    Rust writer says "StorageFull")."""
    if isinstance(err, DiskFullError):
        return True
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(s in str(err) for s in ("No space left on device", "StorageFull", "Disk quota exceeded"))


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


class ArtifactStore:
    def __init__(self, root_uri: str):
        self.root_uri = root_uri.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.root_uri)
        self.remote = is_remote(self.root_uri)

    def uri(self, rel: str = "") -> str:
        return f"{self.root_uri}/{rel}" if rel else self.root_uri

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._path(rel))

    def write_bytes(self, rel: str, data: bytes) -> str:
        if self.remote:
            with _refusal_named(self.uri(rel)):
                self.fs.pipe_file(self._path(rel), data)
        else:
            dest = Path(self._path(rel))
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, dest)
            except BaseException as err:
                Path(tmp).unlink(missing_ok=True)
                if is_disk_full(err):
                    raise DiskFullError(str(dest)) from err
                raise
        return self.uri(rel)

    def write_json(self, rel: str, obj: Any) -> str:
        return self.write_bytes(rel, (json.dumps(obj, indent=2, default=str) + "\n").encode())

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode())

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self._path(rel))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def delete(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.rm(self._path(rel), recursive=True)

    def put_dir(self, local_dir: str | Path, rel: str) -> str:
        """Publish a finished local folder as `rel`, replacing what was there."""
        local_dir = Path(local_dir)
        if self.remote:
            self.delete(rel)
            for p in sorted(local_dir.rglob("*")):
                if p.is_file():
                    name = f"{rel}/{p.relative_to(local_dir).as_posix()}"
                    with _refusal_named(self.uri(name)):
                        self.fs.put_file(str(p), self._path(name))
            return self.uri(rel)
        dest = Path(self._path(rel))
        dest.parent.mkdir(parents=True, exist_ok=True)
        if local_dir.resolve() == dest.resolve():
            return self.uri(rel)
        staging = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}")
        if _same_device(local_dir, dest.parent):
            os.rename(local_dir, staging)
        else:
            try:
                shutil.copytree(local_dir, staging)
            except BaseException as err:  # a partial copy must not stay beside the outputs
                shutil.rmtree(staging, ignore_errors=True)
                if is_disk_full(err):  # shutil.Error carries the errno text of each failed copy
                    raise DiskFullError(str(dest)) from err
                raise
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        if dest.exists():
            os.rename(dest, old)
        os.rename(staging, dest)
        shutil.rmtree(old, ignore_errors=True)
        return self.uri(rel)

    def scratch_dir(self, rel: str) -> Path:
        """A private local folder to build `rel` in before put_dir publishes it."""
        if self.remote:
            return Path(tempfile.mkdtemp(prefix="quantflow-"))
        dest = Path(self._path(rel))
        dest.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_scratch(dest)
        # The builder's pid and host are in the name: a folder left by a killed stage is
        # recognisable (a shared filesystem may hold other hosts' builds).
        return Path(tempfile.mkdtemp(prefix=f".{dest.name}.build-{os.getpid()}@{socket.gethostname()}.",
                                     dir=dest.parent))

    def signature(self, rel: str) -> dict[str, Any]:
        """What a stored file looks like now, cheaply: on S3 its size and ETag (a fresh
        HEAD, not s3fs's listing cache); on disk its sha256 through the content-digest memo
        (a stat when size, mtime, ctime and inode are unchanged)."""
        path = self._path(rel)
        if self.remote:
            info = self.fs.info(path, refresh=True)
            return {"size": info.get("size"), "etag": info.get("ETag")}
        memo = DigestMemo()
        digest = memo.file_digest(Path(path))
        memo.save()
        return {"sha256": digest}

    def listing(self, rel: str) -> dict[str, list]:
        """Every object under a remote folder: relative path -> [size, ETag], listed afresh."""
        base = self._path(rel).rstrip("/")
        self.fs.invalidate_cache(base)
        found = self.fs.find(base, detail=True)
        return {name[len(base) + 1:]: [info.get("size"), info.get("ETag")]
                for name, info in sorted(found.items()) if info.get("type") != "directory"}

    def fetch_dir(self, rel: str, expected: dict[str, str] | None = None) -> Path:
        """A local copy of a stored folder (the folder itself for local stores).

        Remote folders are cached under $QUANTFLOW_CACHE/fetched by content digest, so a
        worker downloads each checkpoint once. Beside each copy, `<key>.source.json` holds
        the remote listing (sizes and ETags) it was downloaded from; a copy is reused only
        while a fresh listing (one LIST request, no download) still matches, so an object
        changed on S3 after the download is downloaded again and its caller re-hashes it.
        """
        if not self.remote:
            return Path(self._path(rel))
        key = digest_of(expected) if expected else digest_of(self.uri(rel))
        dest = cache_root() / "fetched" / key[:24]
        source = dest.with_name(f"{dest.name}.source.json")
        remote = self.listing(rel)
        if dest.is_dir():  # only ever created by a rename below, so it is complete
            try:
                if json.loads(source.read_text()) == remote:
                    return dest
            except (OSError, ValueError):
                pass  # a copy from before listings were recorded: fetched again
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get(self._path(rel) + "/", str(tmp) + "/", recursive=True)
        if dest.is_dir():  # a stale copy: moved aside, then replaced
            old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(dest, old)
            except OSError:
                pass  # another worker moved it first
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, dest)
        except OSError:  # another worker finished the same download first
            shutil.rmtree(tmp, ignore_errors=True)
        fd, tmp_source = tempfile.mkstemp(dir=dest.parent, prefix=f".{source.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(remote, f)
        os.replace(tmp_source, source)
        return dest


@contextmanager
def _refusal_named(uri: str) -> Iterator[None]:
    """s3fs turns S3's 403 into a bare PermissionError("Access Denied"); the person needs
    the object, botocore's own report line and the fix."""
    try:
        yield
    except PermissionError as err:
        raise StorageRefusedError(uri, str(err.__cause__ or err)) from err


def _remove_dead_scratch(dest: Path) -> None:
    """Delete build folders of `dest` whose builder process on this host is gone (a stage
    killed with -9 never reaches its cleanup). A live builder's folder is left alone: another
    run with other settings may be building into the same output folder."""
    for old in dest.parent.glob(f".{dest.name}.build-*@*"):
        pid, _, rest = old.name.removeprefix(f".{dest.name}.build-").partition("@")
        if (pid.isdigit() and rest.rpartition(".")[0] == socket.gethostname()
                and not Path(f"/proc/{pid}").exists()):
            shutil.rmtree(old, ignore_errors=True)


def _same_device(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False
