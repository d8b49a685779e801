"""Measurements with the simulated CRIU client (imgmig.criu_sim's wire protocol, with
data spliced from a memfd so that the client costs little): proxy-to-cache throughput,
CPU and memory per daemon, 10,000 small files, four checkpoints at once.

Every pre-warm touches what the run will take beside its source: a copy in the proxy
and one in the cache (the simulated restore reads into one reused buffer)."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import asdict

from testbed.daemons import Pair

from .common import GB, MIB, Monitor, SimRestore, Source, note_release, prewarm, sim_dump, wait_images_released

RESTORE_TIMEOUT = 120.0
_COMPLETE = re.compile(r"checkpoint (\S+) complete from .*?: (\d+) files, (\d+) bytes in ([\d.]+) s")


def cache_completions(pair: Pair) -> list[tuple[str, int, float]]:
    """(checkpoint, bytes, seconds from CHECKPOINT_BEGIN to verified end) from the cache's log."""
    assert pair.cache is not None
    return [(m.group(1), int(m.group(3)), float(m.group(4))) for m in _COMPLETE.finditer(pair.cache.log())]


def _wait_completions(pair: Pair, count: int, timeout: float = 30.0) -> list[tuple[str, int, float]]:
    deadline = time.monotonic() + timeout
    while True:
        done = cache_completions(pair)
        if len(done) >= count or time.monotonic() > deadline:
            return done
        time.sleep(0.01)


def _wait_released(pair: Pair, count: int, timeout: float = 30.0) -> None:
    """Until the proxy has released `count` checkpoints in all (the cache restored them)."""
    deadline = time.monotonic() + timeout
    while pair.proxy.log().count("releasing this node's copy") < count and time.monotonic() < deadline:
        time.sleep(0.01)


class Session:
    """Keeps count of checkpoints that went through one proxy/cache pair."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.count = 0

    @property
    def pids(self) -> dict[str, int]:
        assert self.pair.cache is not None and self.pair.cache.proc is not None
        assert self.pair.proxy.proc is not None
        return {"proxy": self.pair.proxy.proc.pid, "cache": self.pair.cache.proc.pid}

    def one(self, source: Source, *, monitor: bool = True) -> dict[str, object]:
        """One checkpoint of source.size bytes (pages) through proxy, cache and serve;
        the restore starts first, as in a migration."""
        wait_images_released(self.pids.values())
        restore = SimRestore(self.pair.cache_dir, ["inventory.img", "pagemap-1.img", "pages-1.img"])
        restore.start()
        mon = Monitor(self.pids) if monitor else None
        if mon:
            mon.__enter__()
        started = time.monotonic()
        dump_s = sim_dump(self.pair.proxy_dir, source)
        done = restore.result(RESTORE_TIMEOUT)
        self.count += 1
        completions = _wait_completions(self.pair, self.count)
        _wait_released(self.pair, self.count)
        if mon:
            mon.__exit__(None, None, None)
        note_release()
        if restore.sizes.get("pages-1.img") != source.size:
            raise RuntimeError(f"restore read {restore.sizes} bytes, expected {source.size} of pages")
        total = done - started
        link_bytes, link_s = completions[-1][1], completions[-1][2]
        out: dict[str, object] = {
            "bytes": source.size, "dump_s": dump_s, "end_to_end_s": total,
            "end_to_end_MBps": source.size / total / 1e6,
            "cache_receive_s": link_s, "link_MBps": link_bytes / max(link_s, 0.01) / 1e6,
        }
        if mon:
            out["daemons"] = {name: _daemon_figures(stats, source.size) for name, stats in mon.stats.items()}
        return out

    def small_files(self, count: int, size: int) -> dict[str, float]:
        """`count` files of `size` bytes in one checkpoint, restore reading each in turn."""
        names = [f"small-{i:05d}.img" for i in range(count)]
        data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        restore = SimRestore(self.pair.cache_dir, ["inventory.img", *names])
        restore.start()
        started = time.monotonic()
        dump_s = sim_dump(self.pair.proxy_dir, None, pages=0, small=[(n, data) for n in names])
        done = restore.result(RESTORE_TIMEOUT)
        self.count += 1
        _wait_completions(self.pair, self.count)
        _wait_released(self.pair, self.count)
        if restore.files != count + 1:
            raise RuntimeError(f"restore got {restore.files} files, expected {count + 1}")
        total = done - started
        return {"files": count, "file_bytes": size, "dump_s": dump_s, "end_to_end_s": total,
                "files_per_s": count / total, "dump_files_per_s": count / dump_s}

    def concurrent(self, sources: list[Source]) -> dict[str, float]:
        """len(sources) checkpoints dumped at once through the one proxy and cache, each
        with its own restore; aggregate bytes over the time until the last restore ended.
        The proxy's release of the previous checkpoints (1 s after their restore) is waited
        for here, so that it overlaps the caller's pre-warm."""
        wait_images_released(self.pids.values())
        restores = [SimRestore(self.pair.cache_dir, ["inventory.img", "pagemap-1.img", "pages-1.img"])
                    for _ in sources]
        for r in restores:
            r.start()
        errors: list[BaseException] = []

        def dump(source: Source) -> None:
            try:
                sim_dump(self.pair.proxy_dir, source)
            except BaseException as exc:
                errors.append(exc)

        started = time.monotonic()
        threads = [threading.Thread(target=dump, args=(s,)) for s in sources]
        for t in threads:
            t.start()
        for t in threads:
            t.join(RESTORE_TIMEOUT)
        ends = [r.result(RESTORE_TIMEOUT) for r in restores]
        if errors:
            raise RuntimeError(f"a concurrent dump failed: {errors[0]!r}")
        self.count += len(sources)
        _wait_completions(self.pair, self.count)
        note_release()
        total_bytes = sum(r.sizes.get("pages-1.img", 0) for r in restores)
        expected = sum(s.size for s in sources)
        if total_bytes != expected:
            raise RuntimeError(f"concurrent restores read {total_bytes} bytes, expected {expected}")
        total = max(ends) - started
        return {"checkpoints": len(sources), "bytes": total_bytes, "end_to_end_s": total,
                "aggregate_MBps": total_bytes / total / 1e6}


def _daemon_figures(stats: object, moved: int) -> dict[str, float]:
    d = asdict(stats)  # type: ignore[call-overload]
    return {
        "cpu_s": d["cpu_s"],
        "cpu_s_per_GB": d["cpu_s"] / (moved / GB),
        "peak_rss_beyond_images_MiB": d["peak_rss_beyond_images"] / MIB,
        "baseline_rss_MiB": d["baseline_rss"] / MIB,
        "peak_rss_shmem_MiB": d["peak_rss_shmem"] / MIB,
        "peak_images_held_MiB": d["peak_images_held"] / MIB,
    }


def throughput(session: Session, source: Source, reps: int, log=print) -> list[dict[str, object]]:
    """`reps` checkpoints of source.size bytes, after a small warm-up one."""
    session.one(Source(4 * MIB), monitor=False)  # warm-up: imports, first connections
    runs = []
    for i in range(reps):
        prewarm(2 * source.size)
        runs.append(session.one(source))
        log(f"  sim {source.size // MIB} MiB #{i + 1}: end-to-end {runs[-1]['end_to_end_MBps']:.0f} MB/s, "
            f"link {runs[-1]['link_MBps']:.0f} MB/s")
    return runs


def throughput_only(pair: Pair, *, size: int, reps: int, log=print) -> dict[str, object]:
    """The throughput runs alone (the TLS-on pair's, to set beside run_all's TLS-off ones)."""
    source = Source(size)
    try:
        return {"throughput": throughput(Session(pair), source, reps, log)}
    finally:
        source.close()


def run_all(pair: Pair, *, size: int, reps: int, small_count: int, small_size: int,
            concurrent_size: int, log=print) -> dict[str, object]:
    """The simulated-client part of the benchmark, on one streaming pair."""
    session = Session(pair)
    source = Source(size)
    results: dict[str, object] = {}
    try:
        results["throughput"] = throughput(session, source, reps, log)
        small = []
        for i in range(reps):
            small.append(session.small_files(small_count, small_size))
            log(f"  small files #{i + 1}: {small[-1]['files_per_s']:.0f} files/s")
        results["small_files"] = small
        csrc = [Source(concurrent_size) for _ in range(4)]
        try:
            conc = []
            for i in range(reps):
                prewarm(2 * concurrent_size)  # as throughput(): what the run will take
                one = session.concurrent(csrc[:1])
                prewarm(2 * 4 * concurrent_size)
                four = session.concurrent(csrc)
                conc.append({"one": one, "four": four,
                             "ratio": four["aggregate_MBps"] / one["aggregate_MBps"]})
                log(f"  concurrency #{i + 1}: one {one['aggregate_MBps']:.0f} MB/s, four "
                    f"{four['aggregate_MBps']:.0f} MB/s aggregate")
            results["concurrency"] = conc
        finally:
            for s in csrc:
                s.close()
    finally:
        source.close()
    return results
