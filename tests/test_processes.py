"""Process identity: a recorded (pid, create_time) still names the same live process when
psutil's create_time() moves with the wall clock (psutil#2526), and not a later process."""

from __future__ import annotations

import os

from quantflow.processes import START_TIME_TOLERANCE_S, reused, start_time


def test_a_live_process_is_not_judged_reused_when_its_start_time_reads_a_second_off():
    pid = os.getpid()
    started = start_time(pid)
    assert started is not None
    assert not reused(pid, started)
    assert not reused(pid, started + 1.0) and not reused(pid, started - 1.0)  # NTP moved btime
    assert reused(pid, started - 60) and reused(pid, started + START_TIME_TOLERANCE_S + 0.5)
    assert not reused(pid, None)
