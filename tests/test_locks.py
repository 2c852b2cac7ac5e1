"""Stage locks across processes: exclusive, waited on, and never outliving a killed holder
(flock files on one machine; Redis with a lease and holder tag on the platform)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from services import REDIS_HOST, REDIS_PORT, redis_reason

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from quantflow.storage.locks import FileLocks, RedisLocks
    kind, key, where = sys.argv[1:4]
    locks = FileLocks(Path(where)) if kind == "file" else RedisLocks(lease_s=600)
    assert locks.acquire_lock(key, "holder-a")
    print("held", flush=True)
    time.sleep(600)
""")


def start_holder(kind: str, key: str, where: str, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, kind, key, where], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    assert proc.stdout.readline().strip() == "held"
    return proc


def check_lock_is_exclusive_and_freed_by_a_kill(locks, proc: subprocess.Popen, key: str) -> None:
    assert locks.is_locked(key)
    assert not locks.acquire_lock(key, "holder-b", acquire_timeout=1.5)  # held elsewhere: refused
    proc.send_signal(signal.SIGKILL)  # no release: the holder is gone
    proc.wait(10)
    start = time.monotonic()
    assert locks.acquire_lock(key, "holder-b", acquire_timeout=30)
    waited = time.monotonic() - start
    assert waited < 10, f"the killed holder's lock blocked the next run for {waited:.1f}s"
    assert locks.is_lock_holder(key, "holder-b") and not locks.is_lock_holder(key, "holder-a")
    locks.release_lock(key, "holder-b")
    assert not locks.is_locked(key)


def test_file_lock_is_exclusive_and_dies_with_its_process(tmp_path):
    from quantflow.storage.locks import FileLocks

    key = f"quantflow-test-{uuid.uuid4().hex}"
    proc = start_holder("file", key, str(tmp_path))
    try:
        check_lock_is_exclusive_and_freed_by_a_kill(FileLocks(tmp_path), proc, key)
    finally:
        proc.kill()


def test_redis_lock_is_exclusive_and_broken_when_its_holder_dies(monkeypatch):
    reason = redis_reason()
    if reason:
        pytest.skip(reason)
    from quantflow.storage.locks import RedisLocks

    env = {"PREFECT_REDIS_MESSAGING_HOST": REDIS_HOST, "PREFECT_REDIS_MESSAGING_PORT": str(REDIS_PORT),
           "PREFECT_REDIS_MESSAGING_DB": "13"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    key = f"quantflow-test-{uuid.uuid4().hex}"
    proc = start_holder("redis", key, "", env)
    try:
        locks = RedisLocks(lease_s=600)
        ttl = locks.inner.client.pttl(locks.inner._lock_name_for_key(key))
        assert 0 < ttl <= 600_000  # leased: a holder on another host frees it eventually
        check_lock_is_exclusive_and_freed_by_a_kill(locks, proc, key)
    finally:
        proc.kill()


def test_lock_manager_follows_prefects_broker_setting(monkeypatch):
    from quantflow.storage.locks import FileLocks, RedisLocks, stage_lock_manager

    monkeypatch.delenv("PREFECT_MESSAGING_BROKER", raising=False)
    assert isinstance(stage_lock_manager(), FileLocks)
    monkeypatch.setenv("PREFECT_MESSAGING_BROKER", "prefect_redis.messaging")
    assert isinstance(stage_lock_manager(), RedisLocks)
