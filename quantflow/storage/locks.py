"""Stage locks: two runs that need the same stage output compute it once.

Every cached stage task runs under Prefect's SERIALIZABLE cache isolation: the first run
to reach a cache key takes its lock and computes; any other run with the same key waits on
the lock, then finds the committed result and reports the stage `Cached`.

Which lock manager:
- Redis, when Prefect's messaging broker is Redis (`PREFECT_MESSAGING_BROKER=
  prefect_redis.messaging`, the platform topology): locks span every worker on every host,
  on the same Redis as Prefect's messaging (`PREFECT_REDIS_MESSAGING_*`).
- Otherwise `flock` files under `$QUANTFLOW_CACHE/locks`: every process on this machine.

A run killed with -9 never releases its lock, so a lock must not outlive its holder:
- a flock is released by the kernel when its process dies;
- a Redis lock carries a lease (`QUANTFLOW_STAGE_LOCK_LEASE_S`, default 6 h, the dispatched
  stage timeout) and its holder's host and pid: a waiter on the same host breaks the lock
  at once when that pid is gone; a holder on another host frees it when the lease ends.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from prefect.locking.protocol import LockManager

log = logging.getLogger("quantflow.storage.locks")
POLL_S = 1.0
DEFAULT_LEASE_S = 6 * 3600


def lease_s() -> float:
    """How long a lock or claim from another host is trusted without news of its holder."""
    return float(os.environ.get("QUANTFLOW_STAGE_LOCK_LEASE_S", DEFAULT_LEASE_S))


def redis_configured() -> bool:
    from prefect.settings import Settings

    # A fresh read of the environment (and .env / prefect.toml), not the cached settings.
    return Settings().server.events.messaging_broker == "prefect_redis.messaging"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _BlockingLocks(LockManager):
    """Async entry points run the blocking ones: stage tasks are synchronous."""

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        return self.acquire_lock(key, holder, acquire_timeout, hold_timeout)

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return self.wait_for_lock(key, timeout)


class FileLocks(_BlockingLocks):
    """flock(2) per cache key: exclusive across processes, gone with the process."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._held: dict[str, tuple[str, int]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"])

    def _path(self, key: str) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        return self.directory / f"{key}.lock"

    def _try(self, key: str) -> int | None:
        fd = os.open(self._path(key), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            os.close(fd)
            return None

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        if self.is_lock_holder(key, holder):
            return True
        start, announced = time.monotonic(), False
        while True:
            fd = self._try(key)
            if fd is not None:
                self._held[key] = (holder, fd)
                return True
            if acquire_timeout is not None and time.monotonic() - start >= acquire_timeout:
                return False
            if not announced:
                log.info("another run is computing %s; waiting for it", key)
                announced = True
            time.sleep(min(POLL_S, acquire_timeout or POLL_S))

    def release_lock(self, key: str, holder: str) -> None:
        held = self._held.get(key)
        if held is None:
            return  # released already (a retry re-enters the transaction)
        if held[0] != holder:
            raise ValueError(f"lock {key} is held by {held[0]}, not {holder}")
        fcntl.flock(held[1], fcntl.LOCK_UN)
        os.close(held[1])
        del self._held[key]

    def is_locked(self, key: str) -> bool:
        if key in self._held:
            return True
        fd = self._try(key)
        if fd is None:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        return False

    def is_lock_holder(self, key: str, holder: str) -> bool:
        return self._held.get(key, ("", -1))[0] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        start = time.monotonic()
        while self.is_locked(key) and key not in self._held:
            if timeout is not None and time.monotonic() - start >= timeout:
                return False
            time.sleep(POLL_S)
        return True


class RedisLocks(_BlockingLocks):
    """prefect-redis's lock manager, with a lease and a holder tag (host:pid) so that a
    lock left by a killed run does not block the next one."""

    def __init__(self, lease_s: float = DEFAULT_LEASE_S) -> None:
        from prefect_redis.client import RedisMessagingSettings
        from prefect_redis.locking import RedisLockManager

        settings = RedisMessagingSettings()
        self.lease_s = lease_s
        self.inner = RedisLockManager(host=settings.host, port=settings.port, db=settings.db,
                                      password=settings.password or None, ssl=settings.ssl,
                                      connection_url=settings.url)

    def __getstate__(self) -> dict[str, Any]:
        return {"lease_s": self.lease_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["lease_s"])

    @staticmethod
    def _tag(holder: str) -> str:
        return f"{holder}@{socket.gethostname()}:{os.getpid()}"

    def _break_if_orphaned(self, key: str) -> bool:
        from redis.lock import Lock

        name = self.inner._lock_name_for_key(key)
        token = self.inner.client.get(name)
        if token is None:
            return False
        owner = token.decode(errors="replace").rsplit("@", 1)[-1]
        host, _, pid = owner.rpartition(":")
        if host != socket.gethostname() or not pid.isdigit() or _alive(int(pid)):
            return False
        try:
            Lock(self.inner.client, name).do_release(token)  # compare-and-delete
        except Exception:  # noqa: BLE001 - someone else broke or released it first
            return False
        log.warning("broke stage lock %s: its holder (pid %s on this host) is gone", key, pid)
        return True

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        start, announced = time.monotonic(), False
        while True:
            step = POLL_S if acquire_timeout is None else max(0.0, min(POLL_S, acquire_timeout - (time.monotonic() - start)))
            if self.inner.acquire_lock(key, self._tag(holder), acquire_timeout=step or 0.01,
                                       hold_timeout=hold_timeout or self.lease_s):
                return True
            if self._break_if_orphaned(key):
                continue
            if acquire_timeout is not None and time.monotonic() - start >= acquire_timeout:
                return False
            if not announced:
                log.info("another run is computing %s; waiting for it", key)
                announced = True

    def release_lock(self, key: str, holder: str) -> None:
        self.inner.release_lock(key, self._tag(holder))

    def is_locked(self, key: str) -> bool:
        return self.inner.is_locked(key)

    def is_lock_holder(self, key: str, holder: str) -> bool:
        return self.inner.is_lock_holder(key, self._tag(holder))

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        start = time.monotonic()
        while self.is_locked(key):
            if self._break_if_orphaned(key):
                continue
            if timeout is not None and time.monotonic() - start >= timeout:
                return False
            time.sleep(POLL_S)
        return True


def stage_lock_manager() -> LockManager:
    if redis_configured():
        return RedisLocks(lease_s())
    from quantflow.storage.hashing import cache_root

    return FileLocks(cache_root() / "locks")
