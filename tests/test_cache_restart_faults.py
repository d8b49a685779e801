"""Fault test of issue 8: the cache restarted at 5 random points of a transfer.

The real imgmig-proxy forwards a checkpoint that simulated CRIU dumps into it; the real
imgmig-cache runs the way systemd runs it (test_systemd_units' shim): its listening
sockets are held here and passed in, and what it puts in the fd store comes back to the
next process. Each restart is a SIGTERM, then a new process given the sockets and the
stored fds, as `systemctl restart imgmig-cache.service` does. The listening socket stays
open throughout, so the proxy's reconnection waits in its backlog, as with systemd.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import time
from pathlib import Path

from conftest import Log, wait_until
from test_custody_faults import SIZE_MIB, PagesRestore
from test_systemd_units import (  # noqa: F401 - notify_socket is a fixture
    _cache_sockets,
    _run_with_fds,
    cache_argv,
    notify_socket,
    stop,
)

from imgmig import criu_sim
from imgmig.system.fdstore import newest_document

RESTARTS = 5


class RestartableCache:
    """imgmig-cache under a stand-in for systemd: sockets passed in, the fd store kept here."""

    def __init__(self, config: Path, tmp: Path, port: int, notify: Path, notes) -> None:  # type: ignore[no-untyped-def]
        (tmp / "cache").mkdir(exist_ok=True)
        self.sockets = list(_cache_sockets(tmp, port))
        self.config, self.notify, self.notes = config, notify, notes
        self.log = Log(tmp / "cache.log", "imgmig-cache")
        self.process = self._start()

    def _start(self):  # type: ignore[no-untyped-def]
        self.notes.messages.clear()
        process = _run_with_fds(cache_argv(self.config), self.sockets, dict(self.notes.stored), self.notify,
                                self.log.path)
        self.notes.wait_for("READY", "1")
        return process

    def holds_a_partial_image(self) -> bool:
        """The fd store's metadata (the memfd the daemon writes in place) lists an image: the
        daemon mirrors its store there a moment after a file begins, from another thread."""
        self.notes.poll(0.01)
        meta = newest_document(self.notes.stored)
        return meta is not None and any(checkpoint["images"] for checkpoint in meta["checkpoints"])

    def restart(self) -> tuple[float, float]:
        """SIGTERM, then a new process with the stored fds; (when it began, when the new one was READY)."""
        wait_until(self.holds_a_partial_image, 10, "the checkpoint's first image in the fd store")
        began = time.monotonic()
        assert stop(self.process) == 0, self.log
        self.notes.poll()
        self.process = self._start()
        return began, time.monotonic()

    def close(self) -> int:
        code = stop(self.process)
        for sock in self.sockets:
            sock.close()
        return code


def test_cache_restarted_at_five_random_points_resumes_every_time(daemons, notify_socket):  # noqa: F811
    pair = daemons(roles=("proxy",), memory_limit=f"{SIZE_MIB * 2 + 64}MiB")
    notify, notes = notify_socket
    cache = RestartableCache(pair.config, pair.tmp, pair.port, notify, notes)
    try:
        rng = random.Random(int(os.environ.get("IMGMIG_FAULT_SEED", "8")))
        points = sorted(rng.sample(range(1, SIZE_MIB - 1), RESTARTS))
        block = os.urandom(1 << 20)
        hasher = hashlib.sha256()
        client = criu_sim.DumpClient(pair.proxy_dir)
        pages = client.open_image("pages-1.img")
        downtimes, recoveries = [], []
        started = time.monotonic()
        for n in range(SIZE_MIB):
            if points and n == points[0]:
                points.pop(0)
                done = len(recoveries)
                # the checkpoint is under way at the cache (begun or resumed there), not yet complete
                cache.log.wait_for(r"checkpoint \S+ (begins|resumes) from", count=done + 1)
                began, ready = cache.restart()
                pair.proxy_log.wait_for(r"back after", timeout=60, count=done + 1)
                downtimes.append(ready - began)
                recoveries.append(time.monotonic() - ready)
            chunk = n.to_bytes(8, "big") + block[8:]
            hasher.update(chunk)
            criu_sim.write_all(pages, chunk)
        os.close(pages)
        client.write_image("inventory.img", b"inv")
        client.close()
        restorer = PagesRestore(pair.cache_dir)
        restorer.thread.join(120)
        elapsed = time.monotonic() - started
        assert restorer.error is None, restorer.error
        assert restorer.result == (SIZE_MIB << 20, hasher.digest()), "the restore read exactly what was dumped"
        backs = pair.proxy_log.matching(r"back after")
        assert len(backs) == RESTARTS and all("resuming after" in line for line in backs), "\n".join(backs)
        resent, resent_acked = map(int, re.search(r"resent so far: (\d+) bytes, of them acknowledged before: "
                                                  r"(\d+)", backs[-1]).groups())
        assert resent_acked == 0, "nothing the cache acknowledged was sent again"
        taken_back = cache.log.matching(r"taken back from systemd's fd store after a restart: .*still arriving")
        assert len(taken_back) == RESTARTS, str(cache.log)
        assert not pair.proxy_log.errors(new=False) and not cache.log.errors(new=False)
        cache.log.wait_for(r"restored from the cache: 2 files served")
        pair.proxy_log.wait_for(r"releasing this node's copy")
    finally:
        code = cache.close()
    assert code == 0, str(cache.log)
    assert not [line for line in cache.log.lines() if "Traceback" in line or "unexpected error" in line]
    print(f"\nFAULT TABLE cache restarts: {SIZE_MIB} MiB checkpoint, {RESTARTS} restarts injected, "
          f"{len(backs)} resumed from the fd store, 1/1 restored with matching digest; bytes resent: {resent}, "
          f"past the acknowledged offset: {resent_acked}; cache down (SIGTERM to READY): median "
          f"{sorted(downtimes)[RESTARTS // 2]:.2f} s; time to recover (READY to transfer resumed): median "
          f"{sorted(recoveries)[RESTARTS // 2]:.2f} s, max {max(recoveries):.2f} s; whole transfer {elapsed:.1f} s")
