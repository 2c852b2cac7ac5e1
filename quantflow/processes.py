"""Detached helper processes (vLLM servers, the exporter, the local Prefect server, workers).

Each is started in its own session, so its process group id equals its pid and one
signal reaches it and its children. Records keep the leader's start time: a pid read back
from disk is only signalled if it is still that process, never a newcomer that reused it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil


def start_detached(cmd: list[str], log_path: Path, env: dict[str, str], cwd: str | None = None
                   ) -> tuple[subprocess.Popen, dict]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env, cwd=cwd)
    return proc, {"pid": proc.pid, "create_time": start_time(proc.pid)}


def start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


# psutil's create_time() is the start in clock ticks plus a boot time it re-reads from
# /proc/stat, which the kernel recomputes from the wall clock: when NTP adjusts the clock the
# same live process can read seconds apart (psutil#2526). With a 0.01 s match, 2 of the 15
# servers of one benchmarks/model_matrix.py run were left running after their stop, most
# likely so. A pid is not handed to a new process within seconds of the old one (pids count
# up to pid_max before they wrap).
START_TIME_TOLERANCE_S = 2.0


def reused(pid: int, create_time: float | None) -> bool:
    """The pid now belongs to a different process than the one recorded."""
    if create_time is None:
        return False
    now = start_time(pid)
    return now is not None and abs(now - create_time) > START_TIME_TOLERANCE_S


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is pgid."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().split(") ", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def stop_groups(records: list[dict], waits: tuple[float, ...] = (10, 5, 5),
                on_wait=None) -> None:
    """SIGTERM, SIGTERM again (a server still starting can ignore the first), then SIGKILL,
    to every recorded group at once, until no member of any group is left."""
    groups = [r["pid"] for r in records if r.get("pid") and not reused(r["pid"], r.get("create_time"))]
    for sig, wait in zip((signal.SIGTERM, signal.SIGTERM, signal.SIGKILL), waits):
        groups = [g for g in groups if group_members(g)]
        if not groups:
            return
        for g in groups:
            try:
                os.killpg(g, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + wait
        while time.monotonic() < end and any(group_members(g) for g in groups):
            if on_wait:
                on_wait()
            time.sleep(0.2)


def processes_with_env(key: str, value: str) -> list[int]:
    """Live processes started with `key=value` in their environment. A tag in the
    environment is inherited by every child and is there from exec on, so it finds a
    server even when its starter died before it could write the pid down."""
    needle = f"{key}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().split(") ", 1)[1].split()[0]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if state != "Z":
            found.append(int(entry))
    return found


def stop_tagged(key: str, value: str) -> list[int]:
    """Stop the process groups of every process tagged `key=value`; returns their pids."""
    pids = processes_with_env(key, value)
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    groups.discard(os.getpgrp())  # tagged servers run in their own sessions; never our own group
    stop_groups([{"pid": g} for g in sorted(groups)])
    return pids
