"""A verifiable workload for migrations: `python3 -m testbed.workload --mib N --state FILE`.

It fills N MiB with a deterministic, incompressible pattern (SHAKE-128 of a seed),
records the buffer's SHA-256 (with --pattern-cache, the one kept beside the cached
pattern it read), then counts forever. Every ~100 ms it replaces FILE
(write + rename, so no file stays open across a dump) with one JSON line: pid, a
random token drawn at start, the counter, the start digest, and the digest of the
most recent re-verification (SIGUSR1 asks for one; the count of them is in the line),
and the longest stall the process felt: a ticker thread wakes every 2 ms and keeps the
longest gap between two of its ticks on CLOCK_REALTIME (time.time()), because CRIU
restores CLOCK_MONOTONIC through a time namespace that hides the freeze. SIGUSR2 starts
that maximum afresh (the count of resets is in the line). With --touch N, a third thread
reads one byte of N pages a second, picked at random over the whole buffer, and counts
them (`touched` in the line): its rate is the workload's own throughput, which drops
while the pages it reads are still missing after a lazy restore (each such read is a
page fault served from the source).

After a restore the test proves continuation (same token, counter past its pre-dump
value) and intact memory (a fresh re-verification equals the digest expected for N
MiB and the seed, computed independently by expected_digest()).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import mmap
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CHUNK = 16 << 20
WRITE_EVERY = 0.1
TICK = 0.01
GAP_TICK = 0.002
TOUCH_TICK = 0.01
PAGE = 4096


def fill(buf: bytearray | mmap.mmap, seed: int) -> None:
    """Deterministic pattern: chunk i is SHAKE-128(seed, i)."""
    for index, offset in enumerate(range(0, len(buf), CHUNK)):
        size = min(CHUNK, len(buf) - offset)
        buf[offset:offset + size] = hashlib.shake_128(f"imgmig-{seed}-{index}".encode()).digest(size)


def fill_cached(buf: bytearray | mmap.mmap, seed: int, cache_dir: Path | None) -> str:
    """fill(), and return the buffer's SHA-256. With cache_dir (a tmpfs), through a copy
    of the pattern kept there with its SHA-256 beside it: reading both back is several
    times faster than SHAKE-128 and SHA-256, which matters to a benchmark that starts a
    fresh workload of up to 4 GiB for every run."""
    if cache_dir is None:
        fill(buf, seed)
        return hashlib.sha256(buf).hexdigest()
    path = cache_dir / f"workload-pattern-{seed}-{len(buf)}"
    digest_path = path.with_name(f"{path.name}.sha256")
    try:
        with open(path, "rb") as f:
            if f.readinto(buf) == len(buf):
                return digest_path.read_text()
    except FileNotFoundError:
        pass
    fill(buf, seed)
    digest = hashlib.sha256(buf).hexdigest()
    _write_new(digest_path, digest.encode())  # first: a pattern in the cache always has its digest
    _write_new(path, buf)
    return digest


def _write_new(path: Path, data: bytes | bytearray | mmap.mmap) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.rename(tmp, path)


def expected_digest(mib: int, seed: int = 1) -> str:
    """The SHA-256 a workload of `mib` MiB and `seed` must report, computed here
    without holding the whole buffer."""
    total, sha = mib << 20, hashlib.sha256()
    for index, offset in enumerate(range(0, total, CHUNK)):
        size = min(CHUNK, total - offset)
        sha.update(hashlib.shake_128(f"imgmig-{seed}-{index}".encode()).digest(size))
    return sha.hexdigest()


@dataclass(frozen=True)
class State:
    pid: int
    token: str
    counter: int
    digest: str
    verified_digest: str
    verifications: int
    mib: int
    max_gap_s: float = 0.0
    gap_resets: int = 0
    written: float = 0.0  # time.time() when the line was written: tells a restored task's lines from older ones
    touched: int = 0  # pages the --touch thread has read so far

    @classmethod
    def read(cls, path: Path) -> State | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


def _write_state(path: Path, state: State) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state.__dict__) + "\n")
    os.rename(tmp, path)


class GapTicker(threading.Thread):
    """Tick every GAP_TICK and keep the longest gap between ticks on CLOCK_REALTIME; a
    gap still running (the ticker not scheduled yet after a restore) counts too."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.last = time.time()
        self.longest = 0.0
        self.resets_asked = 0  # resets are done by this thread, so no update of `longest` is lost
        self._resets_done = 0

    def run(self) -> None:
        while True:
            time.sleep(GAP_TICK)
            now = time.time()
            asked = self.resets_asked
            self.longest = 0.0 if asked != self._resets_done else max(self.longest, now - self.last)
            self._resets_done = asked
            self.last = now

    def max_gap(self) -> float:
        return max(self.longest, time.time() - self.last)

    def reset(self) -> None:
        self.resets_asked += 1


class Toucher(threading.Thread):
    """Read one byte of `per_second` random pages of `buf` a second, in batches every
    TOUCH_TICK, paced against the wall clock: the count falls behind the demand only
    when reads stall (page faults) or the thread gets no CPU."""

    def __init__(self, buf: bytearray | mmap.mmap, per_second: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.buf, self.per_second = buf, per_second
        self.rng = random.Random(seed)
        self.touched = 0

    def run(self) -> None:
        pages = len(self.buf) // PAGE
        owed, last = 0.0, time.time()
        while True:
            time.sleep(TOUCH_TICK)
            now = time.time()
            owed = min(owed + (now - last) * self.per_second, self.per_second * TOUCH_TICK)  # no catching up
            last = now
            while owed >= 1:
                _ = self.buf[self.rng.randrange(pages) * PAGE]  # the read is the work (a fault if missing)
                self.touched += 1
                owed -= 1


def run(mib: int, state_path: Path, seed: int, pattern_cache: Path | None = None, touch: int = 0) -> None:
    # private anonymous memory, as a bytearray's, without the bytearray's memset: the
    # fill is then the only pass over it (a benchmark starts a fresh workload every run)
    buf = mmap.mmap(-1, mib << 20, flags=mmap.MAP_PRIVATE)
    digest = fill_cached(buf, seed, pattern_cache)
    token = os.urandom(8).hex()
    verify = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: verify.set())
    reset = threading.Event()
    signal.signal(signal.SIGUSR2, lambda *_: reset.set())
    ticker = GapTicker()
    ticker.start()
    toucher = Toucher(buf, touch, seed) if touch else None
    if toucher:
        toucher.start()
    counter, verifications, verified, resets = 0, 0, digest, 0
    last_write = 0.0
    while True:
        counter += 1
        if verify.is_set():
            verify.clear()
            verified = hashlib.sha256(buf).hexdigest()
            verifications += 1
            last_write = 0.0
        if reset.is_set():
            reset.clear()
            ticker.reset()
            resets += 1
            last_write = 0.0
        now = time.monotonic()
        if now - last_write >= WRITE_EVERY:
            _write_state(state_path, State(os.getpid(), token, counter, digest, verified, verifications, mib,
                                           ticker.max_gap(), resets, time.time(),
                                           toucher.touched if toucher else 0))
            last_write = now
        time.sleep(TICK)


def start(mib: int, state_path: Path, *, seed: int = 1, log_path: Path | None = None,
          pattern_cache: Path | None = None, touch: int = 0) -> subprocess.Popen:
    """Start the workload as a child of the caller, in its own session (so CRIU can
    dump it without the caller's terminal or process group), stdin from /dev/null.
    Keep the Popen and wait() on it: the dump kills the task, and a zombie would keep
    the PID that the restore needs."""
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root)
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen([sys.executable, "-m", "testbed.workload", "--mib", str(mib),
                                 "--state", str(state_path), "--seed", str(seed),
                                 *(["--pattern-cache", str(pattern_cache)] if pattern_cache else []),
                                 "--touch", str(touch)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                                start_new_session=True, close_fds=True)
    finally:
        if log_path:
            out.close()  # type: ignore[union-attr]


def wait_state(path: Path, predicate: Callable[[State], bool] = lambda _: True, timeout: float = 60.0) -> State:
    """Poll the state file until a state satisfies predicate; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = State.read(path)
        if last is not None and predicate(last):
            return last
        time.sleep(0.02)
    raise TimeoutError(f"{path}: no matching workload state within {timeout:.0f} s; last: {last}")


def verify(pid: int, path: Path, timeout: float = 30.0) -> State:
    """Ask the workload (SIGUSR1) to re-hash its buffer now; return the state that
    carries that fresh digest."""
    before = State.read(path)
    seen = before.verifications if before else 0
    os.kill(pid, signal.SIGUSR1)
    return wait_state(path, lambda s: s.verifications > seen, timeout)


def reset_gap(pid: int, path: Path, timeout: float = 30.0) -> State:
    """Ask the workload (SIGUSR2) to start its longest-gap figure afresh; return the
    first state written after the reset."""
    before = State.read(path)
    seen = before.gap_resets if before else 0
    os.kill(pid, signal.SIGUSR2)
    return wait_state(path, lambda s: s.gap_resets > seen, timeout)


def stop(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m testbed.workload", description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB of memory to fill and hold")
    parser.add_argument("--state", type=Path, required=True, help="state file, replaced every ~100 ms")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pattern-cache", type=Path, help="directory (tmpfs) to keep a copy of the pattern in")
    parser.add_argument("--touch", type=int, default=0, help="random pages to read a second (0: none)")
    args = parser.parse_args(argv)
    run(args.mib, args.state, args.seed, args.pattern_cache, args.touch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
