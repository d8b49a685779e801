"""Real-CRIU migrations of a real workload between two network namespaces, six ways:

- imgmig: `criu restore --stream` started first on B's cache, `criu dump --stream` into
  A's proxy; the proxy streams to the cache while the dump runs.
- store-and-forward: a pair with `transfer: store-and-forward` (the proxy forwards
  nothing until the dump ended, the cache serves nothing until all arrived) and `tls:
  off`: issue 11's baseline, compared with imgmig-tls-off.
- imgmig-tls-off: as imgmig (which runs mutual TLS, as shipped) on a pair with
  `tls: off`: issue 11's targets are TLS off; imgmig / imgmig-tls-off is the trust
  issue's cost of TLS.
- disk-style: `criu dump -D` into tmpfs on A, `tar | socat -b 131072` over the veth
  into tmpfs on B, `criu restore -D` from there.
- floor: `criu dump -D` into tmpfs and `criu restore -D` from it, one node, no network.
- lazy: post-copy through a fourth proxy/cache pair (bench/lazy.py).

Freeze-to-running is timed from the start of `criu dump` until `criu restore -d`
returned; the restored task is then checked to be counting on, killed and reaped. What a
run spends around that (workload start, waits, pre-warm, check, tear-down) is in its
`setup_s`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from imgmig.commands.common import ControlClient
from imgmig.commands.migrate import PREPARE_WAIT, resident_bytes
from imgmig.roles.endpoints import CONTROL_SOCKET
from testbed import daemons, migrate, workload
from testbed.netns import Node, TwoNodes

from . import lazy
from .common import (
    GB,
    IMAGE_MEMFDS,
    MIB,
    Laps,
    Monitor,
    ReleaseWatch,
    cpu_seconds,
    make_cold,
    memfd_bytes,
    note_release,
    prewarm,
    vm_reported_kib,
    wait_images_released,
)
from .simulated import cache_completions

TMPFS = Path("/dev/shm")
SOCAT_BLOCK = 131072
TAR_BLOCKS = 256  # 256 x 512 = 128 KiB records
FULL_COPY = ("imgmig", "disk-style", "store-and-forward", "floor", "imgmig-tls-off")
METHODS = (*FULL_COPY, "lazy")
DAEMON_METHODS = ("imgmig", "store-and-forward", "imgmig-tls-off")
# Daemons' CPU and memory sampled (issue 11's are TLS off). Store-and-forward too: the sampling
# thread costs ~5 % of a CPU, and on two CPUs every method should pay it alike.
MONITORED = ("imgmig", "imgmig-tls-off", "store-and-forward")
DISK_PORT = 9881
STREAM_PORT = 9996
SAF_PORT = 9997
PLAIN_PORT = 9998
LAZY_PORT = 9993
RUN_TIMEOUT = 180.0
# a proxy/cache pair per method that uses the daemons: port, transfer, TLS on
PAIRS = {"imgmig": (STREAM_PORT, "streaming", True),
         "store-and-forward": (SAF_PORT, "store-and-forward", False),  # issue 11's baseline is TLS off
         "imgmig-tls-off": (PLAIN_PORT, "streaming", False),
         "lazy": (LAZY_PORT, "streaming", True)}


class RealBench:
    def __init__(self, criu: Sequence[str], nodes: TwoNodes, workdir: Path, log: Callable[[str], None]) -> None:
        self.criu = list(criu)
        self.nodes = nodes
        self.workdir = workdir
        self.log = log
        self.tmpfs = Path(TMPFS / f"imgmig-bench-{workdir.name}")
        self.tmpfs.mkdir(parents=True, exist_ok=True)
        self.pairs: dict[str, daemons.Pair] = {}
        self.counts = dict.fromkeys(DAEMON_METHODS, 0)
        self._stack: list[object] = []
        self._release: ReleaseWatch | None = None
        self.lazy_stopped_from_mib = lazy.STOPPED_FROM_MIB
        # bench.profile's: right before the freeze (after prepare), and once the process runs again
        self.on_freeze: Callable[[], None] = lambda: None
        self.on_running: Callable[[], None] = lambda: None

    # ---- daemons ----------------------------------------------------------------------
    def __enter__(self) -> RealBench:
        for method, (port, transfer, tls) in PAIRS.items():
            ctx = daemons.proxy_and_cache(self.workdir / method, self.nodes.a, self.nodes.b, port=port,
                                          transfer=transfer, memory_limit="60%", tls=tls)
            self.pairs[method] = ctx.__enter__()
            self._stack.append(ctx)
        return self

    def __exit__(self, *exc: object) -> None:
        for ctx in reversed(self._stack):
            ctx.__exit__(None, None, None)  # type: ignore[attr-defined]
        shutil.rmtree(self.tmpfs, ignore_errors=True)

    def daemon_pids(self, method: str = "imgmig") -> dict[str, int]:
        pair = self.pairs[method]
        assert pair.cache is not None and pair.cache.proc is not None and pair.proxy.proc is not None
        return {"proxy": pair.proxy.proc.pid, "cache": pair.cache.proc.pid}

    # ---- one run ------------------------------------------------------------------------
    def run(self, method: str, mib: int, mode: str) -> dict[str, object]:
        """One migration of a fresh workload holding `mib` MiB; `mode` is cold or warm."""
        if method == "lazy":
            result = lazy.run(self, mib, mode)
            note_release()
            result.update(method=method, mib=mib, mode=mode, loadavg_1m=os.getloadavg()[0])
            return result
        setup: dict[str, float] = {}
        clock = Laps(setup)
        state = self.workdir / f"state-{method}-{mib}.json"
        state.unlink(missing_ok=True)
        proc = workload.start(mib, state, log_path=self.workdir / "workload.log", pattern_cache=self.tmpfs)
        reaper = threading.Thread(target=proc.wait, daemon=True)
        reaper.start()
        restored: int | None = None
        prewarm_s = None
        try:
            before = workload.wait_state(state, lambda s: s.counter >= 1, 120)  # its first line: it runs
            self.nodes.a.pin(proc.pid)  # the migrated process runs on the source (its threads all exist by now)
            clock.lap("workload_start")
            self.settle()
            clock.lap("settle")
            if mode == "cold":
                make_cold()
            else:
                prewarm_s = prewarm(warm_bytes(method, mib))
            clock.lap("cold_wait" if mode == "cold" else "prewarm")
            workload.reset_gap(proc.pid, state)
            streams = method in DAEMON_METHODS and PAIRS[method][1] == "streaming"
            prepared = self._prepare(method, proc.pid) if streams else {}
            clock.lap("prepare")
            self.on_freeze()
            reported = vm_reported_kib()
            mon = Monitor(self.daemon_pids(method)) if method in MONITORED else None
            if mon:
                mon.__enter__()
            clock.lap("other")
            if method in DAEMON_METHODS:
                result, restored = self._imgmig(method, proc.pid)
            elif method == "floor":
                result, restored = self._floor(proc.pid, reaper)
            else:
                result, restored = self._disk(proc.pid, reaper)
            restored_by = time.time()
            self.on_running()
            clock.lap("migration")
            if mon:
                mon.__exit__(None, None, None)
                result["daemons"] = {name: {
                    "cpu_s": s.cpu_s,
                    "cpu_s_per_GB": s.cpu_s / (result["image_bytes"] / GB) if result.get("image_bytes") else None,
                    "peak_rss_beyond_images_MiB": s.peak_rss_beyond_images / MIB,
                    "baseline_rss_MiB": s.baseline_rss / MIB,
                    "peak_rss_shmem_MiB": s.peak_rss_shmem / MIB,
                    "peak_images_held_MiB": s.peak_images_held / MIB,
                } for name, s in mon.stats.items()}
            # a line written after the restore returned, not the last one from before the dump
            after = workload.wait_state(state, lambda s: s.token == before.token and s.counter > before.counter
                                        and s.written > restored_by, 30)
            if after.pid != proc.pid:
                raise RuntimeError(f"{method}: the restored workload reports pid {after.pid}, not {proc.pid}")
            result["felt_gap_s"] = after.max_gap_s
            if reported is not None:
                result["vm_reported_MiB"] = (vm_reported_kib() - reported) / 1024
            result["loadavg_1m"] = os.getloadavg()[0]
            result["prewarm_s"] = prewarm_s
            result.update(prepared)
            clock.lap("check")
        finally:
            if restored is not None:
                migrate.kill_and_reap(restored)
            migrate.kill_and_reap(proc.pid)
            shutil.rmtree(self.tmpfs / "a", ignore_errors=True)
            shutil.rmtree(self.tmpfs / "b", ignore_errors=True)
            note_release()
            if method in DAEMON_METHODS:  # the proxy lets its copy go ~1 s later: noted when it does
                self._release = ReleaseWatch(self.daemon_pids(method).values())
                self._release.start()
            clock.lap("teardown")
        setup.pop("migration")
        result.update(method=method, mib=mib, mode=mode, pid=proc.pid, setup_s=setup)
        return result

    def settle(self) -> None:
        """Until no pair holds images (memfds kept for reuse may stay). A proxy lets its copy
        go about 1 s after the restore (keep_restored_for), which overlaps the next run's
        workload start; the watcher started at the end of the run notes when it happened,
        so that a cold run's idle time counts from then."""
        if self._release is not None:
            self._release.join()
            self._release = None
        pids = [pid for method in self.pairs for pid in self.daemon_pids(method).values()]
        if any(memfd_bytes(pid, IMAGE_MEMFDS[:1]) for pid in pids):
            wait_images_released(pids)
            note_release()

    def _prepare(self, method: str, pid: int) -> dict[str, object]:
        """What `imgmig migrate` does before it freezes the process: both daemons make memory
        ready for its pages (the proxy's `prepare`). Outside freeze-to-running, as there; its
        time and the daemons' CPU for it are reported apart. The store-and-forward pair
        stands for tools that do not, and is not asked."""
        pids = self.daemon_pids(method)
        cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
        started = time.monotonic()
        with ControlClient(self.pairs[method].proxy_dir / CONTROL_SOCKET, "proxy") as proxy:
            reply = proxy.request("prepare", bytes=resident_bytes(pid), timeout=PREPARE_WAIT)
        return {"prepare_s": time.monotonic() - started,
                "prepared_MiB": {"proxy": reply["proxy"] / MIB, "cache": reply["cache"] / MIB},
                "prepare_cpu_s": {name: cpu_seconds(pid) - cpu[name] for name, pid in pids.items()}}

    def _imgmig(self, method: str, pid: int) -> tuple[dict[str, object], int]:
        pair = self.pairs[method]
        proc, rlog, pidfile = migrate.start_restore(self._criu_on(self.nodes.b), pair.cache_dir, self.workdir,
                                                    name=f"restore-{method}")
        try:
            started = time.monotonic()
            dump_s, _ = migrate.dump(self._criu_on(self.nodes.a), pid, pair.proxy_dir, self.workdir,
                                     name=f"dump-{method}", timeout=RUN_TIMEOUT)
            restored = migrate.finish_restore(proc, rlog, pidfile, RUN_TIMEOUT)
            total = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.counts[method] += 1
        done = _wait(lambda: len(cache_completions(pair)) >= self.counts[method], 10)
        completions = cache_completions(pair) if done else []
        out: dict[str, object] = {"total_s": total, "dump_s": dump_s, "restore_after_dump_s": total - dump_s,
                                  "tls": PAIRS[method][2]}
        if completions:
            _, nbytes, seconds = completions[-1]
            out.update(image_bytes=nbytes, link_s=seconds, link_MBps=nbytes / seconds / 1e6)
        return out, restored

    def _floor(self, pid: int, reaper: threading.Thread) -> tuple[dict[str, object], int]:
        images = self.tmpfs / "a"
        images.mkdir()
        started = time.monotonic()
        self._criu_dump(pid, images, "dump-floor")
        dump_s = time.monotonic() - started
        reaper.join(10)  # the dump killed the task; its PID must be free for the restore
        restored = self._criu_restore(images, "restore-floor", self.nodes.a)  # one node: A's
        total = time.monotonic() - started
        nbytes = _tree_bytes(images)
        return {"total_s": total, "dump_s": dump_s, "restore_after_dump_s": total - dump_s,
                "image_bytes": nbytes}, restored

    def _disk(self, pid: int, reaper: threading.Thread) -> tuple[dict[str, object], int]:
        src, dst = self.tmpfs / "a", self.tmpfs / "b"
        src.mkdir()
        dst.mkdir()
        receiver = subprocess.Popen(
            [*self.nodes.b.exec_prefix(), "sh", "-c",
             f"socat -u -b {SOCAT_BLOCK} TCP-LISTEN:{DISK_PORT},reuseaddr STDOUT | tar -C {dst} -b {TAR_BLOCKS} -xf -"],
            stdin=subprocess.DEVNULL)
        try:
            _wait_listening(self.nodes.b.exec_prefix(), DISK_PORT)
            started = time.monotonic()
            self._criu_dump(pid, src, "dump-disk")
            dump_s = time.monotonic() - started
            subprocess.run([*self.nodes.a.exec_prefix(), "sh", "-c",
                            f"tar -C {src} -b {TAR_BLOCKS} -cf - . | "
                            f"socat -u -b {SOCAT_BLOCK} STDIN TCP:{self.nodes.b.address}:{DISK_PORT}"],
                           check=True, timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL)
            if receiver.wait(RUN_TIMEOUT) != 0:
                raise RuntimeError(f"disk-style receiver exited with {receiver.returncode}")
            copied_s = time.monotonic() - started
            reaper.join(10)
            restored = self._criu_restore(dst, "restore-disk", self.nodes.b)
            total = time.monotonic() - started
        finally:
            if receiver.poll() is None:
                receiver.kill()
                receiver.wait()
        return {"total_s": total, "dump_s": dump_s, "copied_at_s": copied_s,
                "restore_after_dump_s": total - dump_s, "image_bytes": _tree_bytes(dst)}, restored

    def _criu_on(self, node: Node) -> list[str]:
        """CRIU's argv run on `node`'s CPUs (CRIU itself runs outside the network namespaces)."""
        return [*node.cpu_prefix(), *self.criu]

    def _criu_dump(self, pid: int, images: Path, name: str) -> None:
        log = self.workdir / f"{name}.log"
        done = subprocess.run([*self._criu_on(self.nodes.a), "dump", "-D", str(images), "-t", str(pid), "-o", log.name,
                               "-W", str(self.workdir)], stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT)
        if done.returncode != 0:
            raise migrate.MigrationFailed(f"criu dump -D {images} exited with {done.returncode}; see {log}")

    def _criu_restore(self, images: Path, name: str, node: Node) -> int:
        log, pidfile = self.workdir / f"{name}.log", self.workdir / f"{name}.pid"
        pidfile.unlink(missing_ok=True)
        done = subprocess.run([*self._criu_on(node), "restore", "-D", str(images), "-d", "--pidfile", str(pidfile),
                               "-o", log.name, "-W", str(self.workdir)], stdin=subprocess.DEVNULL,
                              timeout=RUN_TIMEOUT)
        if done.returncode != 0:
            raise migrate.MigrationFailed(f"criu restore -D {images} exited with {done.returncode}; see {log}")
        return int(pidfile.read_text().strip())

    # ---- the raw link -------------------------------------------------------------------
    def link_baselines(self, nbytes: int, reps: int = 3) -> dict[str, object]:
        """socat (128 KiB blocks) from a tmpfs file on A into a tmpfs file on B, `reps`
        times, and iperf3 (3 s)."""
        src, dst = self.tmpfs / "link-src", self.tmpfs / "link-dst"
        with open(src, "wb") as f:
            block = bytes(range(256)) * 4096
            for _ in range(nbytes // len(block)):
                f.write(block)
        rates = []
        try:
            for _ in range(reps):
                prewarm(2 * nbytes)
                receiver = subprocess.Popen([*self.nodes.b.exec_prefix(), "socat", "-u", "-b", str(SOCAT_BLOCK),
                                             f"TCP-LISTEN:{DISK_PORT},reuseaddr", f"CREATE:{dst}"],
                                            stdin=subprocess.DEVNULL)
                _wait_listening(self.nodes.b.exec_prefix(), DISK_PORT)
                started = time.monotonic()
                subprocess.run([*self.nodes.a.exec_prefix(), "socat", "-u", "-b", str(SOCAT_BLOCK), f"OPEN:{src}",
                                f"TCP:{self.nodes.b.address}:{DISK_PORT}"], check=True, timeout=120,
                               stdin=subprocess.DEVNULL)
                receiver.wait(60)
                rates.append(dst.stat().st_size / (time.monotonic() - started) / 1e6)
                dst.unlink()
        finally:
            src.unlink(missing_ok=True)
            dst.unlink(missing_ok=True)
        out: dict[str, object] = {"socat_128k_runs_MBps": rates}
        server = subprocess.Popen([*self.nodes.b.exec_prefix(), "iperf3", "-s", "-1", "-p", "5299"],
                                  stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        try:
            _wait_listening(self.nodes.b.exec_prefix(), 5299)
            done = subprocess.run([*self.nodes.a.exec_prefix(), "iperf3", "-c", self.nodes.b.address, "-p", "5299",
                                   "-t", "3", "-J"], capture_output=True, text=True, timeout=30,
                                  stdin=subprocess.DEVNULL)
            report = json.loads(done.stdout)
            out["iperf3_MBps"] = report["end"]["sum_received"]["bits_per_second"] / 8 / 1e6
        finally:
            server.wait(10)
        note_release()
        return out


def warm_bytes(method: str, mib: int) -> int:
    """What a warm run touches and frees right before the dump: the memory the migration
    will take beside the running workload. The floor: the tmpfs images and the restored
    process (2 x S); the others: two copies of the images (proxy and cache, or tmpfs on A
    and on B) and the restored process (3 x S)."""
    return (2 if method == "floor" else 3) * mib * MIB


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _wait_listening(prefix: Sequence[str], port: int, timeout: float = 10.0) -> None:
    """Until something listens on TCP `port` inside the namespace (ss -ltn)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = subprocess.run([*prefix, "ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True)
        if done.stdout.strip():
            return
        time.sleep(0.01)
    raise TimeoutError(f"nothing listens on port {port} after {timeout:.0f} s")
