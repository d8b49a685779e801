"""The benchmark's measure of a workload's own throughput (`--touch N`: N random page
reads a second, paced, a missed batch never made up): a real process reads at the asked
rate, and a stall (SIGSTOP, as a page fault or a freeze would) costs it the reads it
could not do."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from testbed import workload

RATE = 300
STOPPED = 1.0


def _rate(a: workload.State, b: workload.State) -> float:
    return (b.touched - a.touched) / (b.written - a.written)


def test_reads_at_the_asked_rate_and_loses_what_a_stall_cost(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    proc = workload.start(4, state, log_path=tmp_path / "workload.log", touch=RATE)
    try:
        first = workload.wait_state(state, lambda s: s.touched > 0, 60)
        before = workload.wait_state(state, lambda s: s.written >= first.written + 1.0, 10)
        assert 0.6 * RATE < _rate(first, before) <= 1.05 * RATE  # 0.6: the reads wait for a CPU on a busy machine
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(STOPPED)
        os.kill(proc.pid, signal.SIGCONT)
        resumed = time.time()
        after = workload.wait_state(state, lambda s: s.written >= resumed + 1.0, 10)
        # about one second of reads of the two seconds and more since `before`: the stall's are lost
        lost = (after.written - before.written) * RATE - (after.touched - before.touched)
        assert 0.8 * STOPPED * RATE < lost < 2 * STOPPED * RATE, (before, after)
    finally:
        proc.kill()
        proc.wait()
