"""Shared pieces of the benchmark: statistics, memory warming, per-process CPU/RSS
accounting and a fast simulated CRIU client.

How daemon memory is counted: image bytes live in memfds (shmem). They are not part
of a process's RSS except while a page is mapped (the digest reads the memfd through a
short-lived mapping, which shows as RssShmem). "RSS beyond the image bytes" is
therefore RssAnon + RssFile from /proc/PID/status (Python heap, libraries, buffers),
sampled every 10 ms, peak kept; the image bytes held are counted separately from the
sizes of the memfds the daemon has open (/proc/PID/fd -> /memfd:imgmig:*).
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imgmig import criu_sim
from imgmig.datapath.serve import SERVE_PIPE
from imgmig.protocol import criu_wire

MIB = 1 << 20
GB = 10**9
STEP = 1 << 20
VM_REPORTED = "/sys/module/page_reporting/parameters/reported_kib"
COLD_IDLE = 1.0  # 3 s until 2026-11-29: the VM handing memory back was never seen (bench/README.md)


# ---- statistics ----------------------------------------------------------------------
def summary(values: Sequence[float]) -> dict[str, float | int | list[float]]:
    """Median with min-max and the raw values."""
    vals = [float(v) for v in values]
    if not vals:
        return {"n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals),
            "values": vals}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


# ---- memory temperature --------------------------------------------------------------
_last_release = [0.0]


def note_release(at: float | None = None) -> None:
    """Call when a run freed its memory (or say when it did, `at`, monotonic): a cold run
    waits COLD_IDLE after the latest release."""
    _last_release[0] = max(_last_release[0], time.monotonic() if at is None else at)


def make_cold() -> None:
    """Let memory that was just freed go back to the host (see the module notes)."""
    wait = COLD_IDLE - (time.monotonic() - _last_release[0])
    if wait > 0:
        time.sleep(wait)


class ReleaseWatch(threading.Thread):
    """Notes the moment the daemons `pids` hold no image memfds any more (note_release), in
    the background: a proxy lets its copy go about 1 s after the restore, while the next
    run's workload starts, and a cold run's idle time counts from that moment, not from
    when the next run looks."""

    def __init__(self, pids: Iterable[int], timeout: float = 15.0) -> None:
        super().__init__(daemon=True)
        self.pids, self.timeout = list(pids), timeout
        self.released = False

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while any(memfd_bytes(pid, IMAGE_MEMFDS[:1]) for pid in self.pids):
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        note_release()
        self.released = True


def prewarm(nbytes: int) -> float:
    """Touch `nbytes` of fresh memory (fallocate on a memfd zeroes every page) and free
    it, so that the next allocations find memory the host already backs. Returns seconds."""
    started = time.monotonic()
    fd = os.memfd_create("imgmig-bench-warm", os.MFD_CLOEXEC)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    finally:
        os.close(fd)
    return time.monotonic() - started


def vm_reported_kib() -> int | None:
    """KiB of free memory this VM has handed back to its host so far (free page
    reporting's counter), or None where the kernel does not expose it."""
    try:
        return int(Path(VM_REPORTED).read_text())
    except (OSError, ValueError):
        return None


# ---- per-process accounting ------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process, all its threads (from /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem", "VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out


IMAGE_MEMFDS = ("/memfd:imgmig:", "/memfd:imgmig-reuse:")


def memfd_bytes(pid: int, prefixes: tuple[str, ...] = IMAGE_MEMFDS) -> int:
    """Bytes held in the daemon's image memfds, and (by default) in the memfds its store
    keeps for reuse (imgmig-reuse:NAME, an image's or kept after one: both are held memory)."""
    seen: dict[tuple[int, int], int] = {}  # by inode: Python's mmap holds a dup of the fd it maps
    fd_dir = f"/proc/{pid}/fd"
    with contextlib.suppress(OSError):
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                if os.readlink(f"{fd_dir}/{fd}").startswith(prefixes):
                    st = os.stat(f"{fd_dir}/{fd}")
                    seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def wait_images_released(pids: Iterable[int], timeout: float = 15.0) -> None:
    """Until the daemons hold no image memfds (a released checkpoint's memfds are closed
    just after the log line that says so): measurements then start from an empty store.
    Memfds kept for reuse stay (up to memory.reuse), so they are not waited for."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while memfd_bytes(pid, IMAGE_MEMFDS[:1]) and time.monotonic() < deadline:
            time.sleep(0.01)


@dataclass
class ProcStats:
    cpu_s: float = 0.0
    peak_rss_beyond_images: int = 0  # bytes: RssAnon + RssFile
    peak_rss_shmem: int = 0
    peak_images_held: int = 0
    baseline_rss: int = 0


class Monitor:
    """Sample daemons' memory while a measurement runs; CPU from the difference of
    /proc/PID/stat. Use as a context manager; read .stats[name] afterwards."""

    def __init__(self, pids: dict[str, int], period: float = 0.01, count_memfds: bool = True) -> None:
        self.pids = pids
        self.period = period
        self.count_memfds = count_memfds
        self.stats = {name: ProcStats() for name in pids}
        self._cpu0: dict[str, float] = {}
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Monitor:
        for name, pid in self.pids.items():
            self._cpu0[name] = cpu_seconds(pid)
            status = _status_kib(pid)
            self.stats[name].baseline_rss = (status.get("RssAnon", 0) + status.get("RssFile", 0)) * 1024
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self._thread.join()
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError):
                self.stats[name].cpu_s = cpu_seconds(pid) - self._cpu0[name]

    def _run(self) -> None:
        tick = 0
        while not self._halt.is_set():
            for name, pid in self.pids.items():
                stats = self.stats[name]
                with contextlib.suppress(OSError):
                    status = _status_kib(pid)
                    beyond = (status.get("RssAnon", 0) + status.get("RssFile", 0)) * 1024
                    stats.peak_rss_beyond_images = max(stats.peak_rss_beyond_images, beyond)
                    stats.peak_rss_shmem = max(stats.peak_rss_shmem, status.get("RssShmem", 0) * 1024)
                if self.count_memfds and tick % 5 == 0:
                    stats.peak_images_held = max(stats.peak_images_held, memfd_bytes(pid))
            tick += 1
            self._halt.wait(self.period)


# ---- a fast simulated CRIU client --------------------------------------------------------
class Source:
    """`size` bytes of random data in a memfd; spliced into CRIU-like pipes without
    copies, so the simulated client costs little CPU."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("imgmig-bench-src", os.MFD_CLOEXEC)
        block = os.urandom(STEP)
        for offset in range(0, size, STEP):
            os.pwrite(self.fd, block[:min(STEP, size - offset)], offset)

    def pump(self, pipe_w: int, size: int | None = None) -> None:
        size = self.size if size is None else size
        offset = 0
        while offset < size:
            offset += os.splice(self.fd, pipe_w, min(STEP, size - offset), offset_src=offset)

    def close(self) -> None:
        os.close(self.fd)


def sim_dump(images_dir: Path, source: Source | None, *, pages: int | None = None,
             small: Sequence[tuple[str, bytes]] = ()) -> float:
    """Dump like CRIU: pagemap and pages open together, then small files, inventory last.
    Returns seconds."""
    started = time.monotonic()
    client = criu_sim.DumpClient(images_dir)
    try:
        if source is not None and (pages is None or pages > 0):
            pagemap = client.open_image("pagemap-1.img")
            pages_w = client.open_image("pages-1.img")
            source.pump(pages_w, pages)
            os.close(pages_w)
            criu_sim.write_all(pagemap, b"P" * 2048)
            os.close(pagemap)
        for name, data in small:
            client.write_image(name, data)
        client.write_image("inventory.img", b"inventory")
    finally:
        client.close()
    return time.monotonic() - started


class SimRestore(threading.Thread):
    """Restore like CRIU: one connection, files asked one after another, each read to the
    end into a reused buffer. Start it before the dump; .done is the monotonic end time.
    Each read() asks for as much as the cache's pipe can hold, as CRIU's do (a pagemap
    entry's pages at once, criu/pagemap.c): a read of less leaves bytes in the pipe and
    reads again at once, and the cache's next splice then spins on the pipe's mutex for
    the whole copy (bench/README.md, "Writing in place"), which CRIU never makes it do."""

    def __init__(self, images_dir: Path, names: Sequence[str]) -> None:
        super().__init__(daemon=True)
        self.images_dir, self.names = images_dir, list(names)
        self.sock = criu_sim.connect(images_dir, serve=True)
        self.bytes = 0
        self.files = 0
        self.sizes: dict[str, int] = {}
        self.done: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        buf = bytearray(SERVE_PIPE)
        try:
            for name in self.names:
                self.sock.sendall(criu_wire.encode_request(name))
                (length,) = criu_sim._LEN.unpack(criu_sim.recv_exact(self.sock, 4))
                if not criu_wire.decode_reply_body(criu_sim.recv_exact(self.sock, length)):
                    continue
                read_end, write_end = os.pipe2(os.O_CLOEXEC)
                socket.send_fds(self.sock, [b"\0"], [write_end])
                os.close(write_end)
                size = 0
                try:
                    while n := os.readv(read_end, [buf]):
                        size += n
                finally:
                    os.close(read_end)
                self.sizes[name] = size
                self.bytes += size
                self.files += 1
            self.done = time.monotonic()
        except BaseException as exc:  # reported by the caller
            self.error = exc
        finally:
            self.sock.close()

    def result(self, timeout: float) -> float:
        self.join(timeout)
        if self.is_alive():
            raise TimeoutError(f"simulated restore from {self.images_dir} did not finish in {timeout:.0f} s")
        if self.error is not None:
            raise RuntimeError(f"simulated restore failed: {self.error!r}") from self.error
        assert self.done is not None
        return self.done


class Laps:
    """Seconds between laps, added up by name into `into` (a run's set-up figures)."""

    def __init__(self, into: dict[str, float]) -> None:
        self.into, self.last = into, time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.into[name] = self.into.get(name, 0.0) + now - self.last
        self.last = now


@dataclass
class Timer:
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Not a hard kill: a check after the block that it stayed within its time."""
    started = time.monotonic()
    yield
    if time.monotonic() - started > seconds:
        print(f"bench: warning: {what} took {time.monotonic() - started:.0f} s (budget {seconds:.0f} s)")
