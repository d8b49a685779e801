"""The benchmark's workload measures the stall it lives through (its longest gap between
2 ms ticks, on CLOCK_REALTIME): a real process, stopped with SIGSTOP for a known time."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from testbed import workload

STOPPED = 0.6
# SIGSTOP takes effect a little after kill() returns (a tick may still come): the gap seen
# is the stop less that delay
SIGNAL_DELAY = 0.05


@pytest.fixture
def task(tmp_path: Path):
    state = tmp_path / "state.json"
    proc = workload.start(1, state, log_path=tmp_path / "workload.log")
    try:
        workload.wait_state(state, lambda s: s.counter >= 3, 60)
        yield proc, state
    finally:
        proc.kill()
        proc.wait()


def test_a_stop_shows_as_the_longest_gap(task) -> None:
    proc, state = task
    before = workload.reset_gap(proc.pid, state)
    os.kill(proc.pid, signal.SIGSTOP)
    time.sleep(STOPPED)
    os.kill(proc.pid, signal.SIGCONT)
    after = workload.wait_state(state, lambda s: s.counter > before.counter, 30)
    assert after.max_gap_s >= STOPPED - SIGNAL_DELAY, after


def test_reset_starts_the_figure_afresh(task) -> None:
    proc, state = task
    os.kill(proc.pid, signal.SIGSTOP)
    time.sleep(STOPPED)
    os.kill(proc.pid, signal.SIGCONT)
    stalled = workload.wait_state(state, lambda s: s.max_gap_s >= STOPPED - SIGNAL_DELAY, 30)
    reset = workload.reset_gap(proc.pid, state)
    assert reset.gap_resets == stalled.gap_resets + 1
    fresh = workload.wait_state(state, lambda s: s.gap_resets == reset.gap_resets and s.counter > reset.counter + 2,
                                30)
    assert fresh.max_gap_s < STOPPED / 2, fresh
