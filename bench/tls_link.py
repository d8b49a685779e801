"""TLS on against TLS off, side by side: proxy -> cache throughput and CPU per side.

    python3 -m bench.tls_link [--mib 1024] [--reps 1]

A proxy and a cache on loopback (no network namespaces: the link is not what is
measured, the encryption is), each checkpoint `--mib` MiB of random pages from the
simulated CRIU client, restored from the cache as it arrives. For each setting: the
cache's receive rate (CHECKPOINT_BEGIN to verified end), end to end, and CPU seconds
per GB of each daemon. Also the digest's own cost per GB (xxh3-128 and sha256 over a
memfd), to judge whether it earns its keep when TLS already protects every byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from imgmig.datapath.kernel_io import hash_region
from testbed import daemons

from .common import GB, MIB, Source
from .simulated import Session

PORT = 9993


@contextmanager
def loopback_pair(workdir: Path, *, tls: bool, port: int = PORT) -> Iterator[daemons.Pair]:
    """imgmig-proxy and imgmig-cache on 127.0.0.1, both node `bench` (one certificate)."""
    workdir.mkdir(parents=True)
    tls_dir = daemons.make_pki(workdir / "pki", {"bench": "127.0.0.1"}) if tls else None
    proxy_dir, cache_dir = workdir / "proxy", workdir / "cache"
    config = daemons.write_config(workdir / "imgmig.yaml", node="bench", proxy_dir=proxy_dir, cache_dir=cache_dir,
                                  peer=f"127.0.0.1:{port}", listen=f"127.0.0.1:{port}", allow=["127.0.0.1"],
                                  memory_limit="60%", transfer="streaming", tls_dir=tls_dir)
    cache = daemons.start("cache", None, config, cache_dir, workdir / "cache.log")
    try:
        proxy = daemons.start("proxy", None, config, proxy_dir, workdir / "proxy.log")
    except BaseException:
        cache.stop()
        raise
    pair = daemons.Pair(workdir, proxy, cache, proxy_dir, cache_dir)
    try:
        yield pair
    finally:
        pair.stop()


def measure(workdir: Path, size: int, reps: int) -> dict[str, object]:
    results: dict[str, object] = {"bytes": size, "reps": reps}
    source = Source(size)
    try:
        for tls in (True, False):
            name = "tls_on" if tls else "tls_off"
            with loopback_pair(workdir / name, tls=tls) as pair:
                session = Session(pair)
                session.one(Source(4 * MIB), monitor=False)  # warm-up: imports, first connection
                results[name] = [session.one(source) for _ in range(reps)]
    finally:
        source.close()
    results["digest_cpu_s_per_GB"] = digest_costs(size)
    return results


def digest_costs(size: int) -> dict[str, float]:
    """CPU seconds per GB of each digest, read through a mapping of a memfd as the daemons do."""
    import os

    import xxhash
    fd = os.memfd_create("imgmig-bench-digest", os.MFD_CLOEXEC)
    try:
        block = os.urandom(MIB)
        for offset in range(0, size, MIB):
            os.pwrite(fd, block, offset)
        costs = {}
        for name, make in (("xxh3-128", xxhash.xxh3_128), ("sha256", hashlib.sha256)):
            hasher = make()
            started = time.process_time()
            for offset in range(0, size, 4 * MIB):
                hash_region(hasher, fd, offset, min(4 * MIB, size - offset))
            costs[name] = (time.process_time() - started) / (size / GB)
        return costs
    finally:
        os.close(fd)


def table(results: dict[str, object]) -> str:
    lines = ["| setting | cache receive MB/s | end to end MB/s | proxy CPU-s/GB | cache CPU-s/GB |",
             "|---|---|---|---|---|"]
    for name in ("tls_on", "tls_off"):
        for run in results[name]:  # type: ignore[attr-defined]
            figures = run["daemons"]
            lines.append(f"| {name.replace('_', ' ')} | {run['link_MBps']:.0f} | {run['end_to_end_MBps']:.0f} | "
                         f"{figures['proxy']['cpu_s_per_GB']:.2f} | {figures['cache']['cpu_s_per_GB']:.2f} |")
    digests = results["digest_cpu_s_per_GB"]
    lines.append("")
    lines.append("digest cost, CPU-s/GB (one side): " + ", ".join(f"{k} {v:.3f}" for k, v in digests.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.tls_link", description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="imgmig-tls-"))
    try:
        results = measure(workdir, args.mib * MIB, args.reps)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
