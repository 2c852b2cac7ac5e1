"""Per-stage wall time and peak memory, for pipeline_summary.json."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import psutil


@dataclass
class StageUsage:
    wall_s: float = 0.0
    # Peak resident memory of this process (and its children) while the stage ran.
    peak_rss_mib: float = 0.0
    # Peak GPU memory allocated by torch, when a GPU was used.
    peak_gpu_mib: float | None = None


def _tree_rss(proc: psutil.Process) -> int:
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total


@contextmanager
def measure(interval_s: float = 0.05) -> Iterator[StageUsage]:
    """Sample RSS on a background thread; RUSAGE maxrss cannot be reset per stage."""
    usage = StageUsage()
    proc = psutil.Process()
    peak = [_tree_rss(proc)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval_s):
            try:
                peak[0] = max(peak[0], _tree_rss(proc))
            except psutil.Error:
                pass

    cuda = _cuda()
    if cuda:
        cuda.reset_peak_memory_stats()
    thread = threading.Thread(target=sample, daemon=True, name="quantflow-rss")
    thread.start()
    start = time.perf_counter()
    try:
        yield usage
    finally:
        usage.wall_s = round(time.perf_counter() - start, 3)
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _tree_rss(proc))
        usage.peak_rss_mib = round(peak[0] / 2**20, 1)
        cuda = _cuda()  # the stage may have been the first to touch the GPU
        if cuda:
            usage.peak_gpu_mib = round(cuda.max_memory_allocated() / 2**20, 1)


def _cuda():
    try:
        import torch
    except ImportError:
        return None
    # Only a process that already uses the GPU: asking otherwise would create a CUDA context
    # in every CPU-only stage and in the orchestrator.
    return torch.cuda if torch.cuda.is_available() and torch.cuda.is_initialized() else None
