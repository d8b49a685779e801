"""The imgmig benchmark: `make bench` (or `python3 -m bench.run --out bench/results`).

Needs root (network namespaces, CRIU), a working CRIU 4.x (testbed.criu finds or builds
one), socat, iperf3 and python3-matplotlib. Writes results.json, results.md and
freeze_to_running.png into --out. `--smoke` is the test suite's run: the smallest size,
one repetition, small simulated loads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from testbed import criu as testbed_criu
from testbed import daemons, migrate, netns

from . import lazy, report, simulated
from .common import MIB, summary
from .realcriu import METHODS, RealBench

FULL = {"sizes": [256, 1024], "lazy_sizes": [256, 1024, 4096], "reps": 5, "sim_mib": 1024, "small_files": 10000,
        "concurrent_mib": 256, "link_mib": 1024, "modes": ["cold", "warm"],
        "lazy_stopped_from_mib": lazy.STOPPED_FROM_MIB}
# the smoke run also stops one lazy copy (512 MiB), so that the 4 GiB runs' path is tested
SMOKE = {"sizes": [256], "lazy_sizes": [256, 512], "reps": 1, "sim_mib": 64, "small_files": 500,
         "concurrent_mib": 16, "link_mib": 64, "modes": ["cold", "warm"], "lazy_stopped_from_mib": 512}
LAZY_MODE = "warm"  # lazy runs in one mode only (bench/README.md, "Lazy migration")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--smoke", action="store_true", help="smallest size, one repetition (the test suite's run)")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                        help="MiB; default 256,1024 (2 GiB on demand: --sizes 256,1024,2048)")
    parser.add_argument("--lazy-sizes", type=lambda s: [int(x) for x in s.split(",")],
                        help="MiB for the lazy method; default 256,1024,4096")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--modes", type=lambda s: s.split(","), help="cold,warm (both by default)")
    parser.add_argument("--methods", type=lambda s: s.split(","), help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--skip-real", action="store_true", help="only the simulated-client parts")
    parser.add_argument("--skip-sim", action="store_true", help="only the real-CRIU parts")
    parser.add_argument("--placement", choices=netns.PLACEMENTS, default="shared",
                        help="shared: both nodes' processes on any CPU (default); per-node: node A's on CPU 0, "
                             "node B's on CPU 1, as on two machines (bench/README.md, Placement)")
    args = parser.parse_args(argv)
    plan = dict(SMOKE if args.smoke else FULL)
    if args.sizes:
        plan["sizes"] = args.sizes
    if args.lazy_sizes:
        plan["lazy_sizes"] = args.lazy_sizes
    if args.reps:
        plan["reps"] = args.reps
    if args.modes:
        plan["modes"] = args.modes
    plan["methods"] = args.methods or list(METHODS)
    plan["placement"] = args.placement
    plan["lazy_mode"] = LAZY_MODE if LAZY_MODE in plan["modes"] else plan["modes"][0]
    plan["lazy_touch_per_s"] = lazy.TOUCH
    plan["lazy_untouched_from_mib"] = lazy.UNTOUCHED_FROM_MIB
    if not set(plan["methods"]) <= set(METHODS) or not set(plan["modes"]) <= {"cold", "warm"}:
        parser.error(f"--methods takes {','.join(METHODS)}; --modes takes cold,warm")
    try:
        netns.placement_cpus(plan["placement"])
    except ValueError as exc:
        parser.error(str(exc))
    if os.geteuid() != 0:
        print("bench: run as root (network namespaces and CRIU need it)", file=sys.stderr)
        return 2
    for tool in ("socat", "iperf3", "tar", "ip", "ss"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed (tools/install-deps.sh installs it)", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {message}", flush=True)

    results: dict[str, object] = {"plan": plan, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                  "machine": _machine()}
    workdir = Path(tempfile.mkdtemp(prefix="imgmig-b-"))  # short: UNIX socket paths <= 108 bytes
    try:
        migrate.become_subreaper()
        with netns.two_nodes("imgmig-bench", placement=plan["placement"]) as nodes:
            parts: dict[str, float] = {}
            results["elapsed_by_part_s"] = parts
            if not args.skip_sim:
                part_started = time.monotonic()
                log("simulated CRIU client, TLS on: throughput, CPU and memory")
                with daemons.proxy_and_cache(workdir / "sim", nodes.a, nodes.b, port=9995,
                                             memory_limit="60%") as pair:
                    results["simulated"] = simulated.throughput_only(pair, size=plan["sim_mib"] * MIB,
                                                                     reps=plan["reps"], log=log)
                log("simulated CRIU client, tls: off (issue 11's targets): throughput, CPU and memory, small files, "
                    "concurrency")
                with daemons.proxy_and_cache(workdir / "sim-plain", nodes.a, nodes.b, port=9994, memory_limit="60%",
                                             tls=False) as pair:
                    results["simulated_tls_off"] = simulated.run_all(
                        pair, size=plan["sim_mib"] * MIB, reps=plan["reps"], small_count=plan["small_files"],
                        small_size=4096, concurrent_size=plan["concurrent_mib"] * MIB, log=log)
                parts["simulated"] = time.monotonic() - part_started
            if not args.skip_real:
                criu = testbed_criu.find_criu()
                with RealBench(criu, nodes, workdir, log) as bench:
                    bench.lazy_stopped_from_mib = plan["lazy_stopped_from_mib"]
                    log(f"link baselines: socat 128 KiB blocks and iperf3 ({plan['link_mib']} MiB)")
                    part_started = time.monotonic()
                    results["link"] = bench.link_baselines(plan["link_mib"] * MIB)
                    parts["link"] = time.monotonic() - part_started
                    results["migrations"] = _migrations(bench, plan, log)
                    for method in plan["methods"]:
                        parts[f"migrations: {method}"] = sum(r["wall_s"] for r in results["migrations"]
                                                             if r["method"] == method)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["elapsed_s"] = time.monotonic() - started
    summary_ = report.summarise(results)
    results["summary"] = summary_
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "results.md").write_text(report.markdown(results))
    if "migrations" in results:
        report.plot(results, args.out / "freeze_to_running.png")
    log(f"done in {results['elapsed_s']:.0f} s: {args.out}/results.md, results.json, freeze_to_running.png")
    print(report.markdown(results))
    return 0


def _migrations(bench: RealBench, plan: dict, log) -> list[dict[str, object]]:
    """Every (size, mode, method), repeated, interleaved: repetition is the outer loop.
    The full-copy methods run at `sizes` in every mode, lazy at `lazy_sizes` in `lazy_mode`."""
    runs = []
    for rep in range(plan["reps"]):
        for mib in sorted(set(plan["sizes"]) | set(plan["lazy_sizes"])):
            for mode in plan["modes"]:
                for method in plan["methods"]:
                    if (mib, mode) not in (_lazy_slots(plan) if method == "lazy" else _full_copy_slots(plan)):
                        continue
                    started = time.monotonic()
                    result = bench.run(method, mib, mode)
                    result.update(rep=rep, wall_s=time.monotonic() - started)  # the run's whole cost, set-up included
                    runs.append(result)
                    log(f"  {method:18s} {mib:5d} MiB {mode}: freeze-to-running {result['total_s']:.2f} s "
                        f"(dump {result['dump_s']:.2f} s, felt {result['felt_gap_s']:.2f} s, "
                        f"load {result['loadavg_1m']:.1f}){_lazy_figures(result)}")
    return runs


def _full_copy_slots(plan: dict) -> set[tuple[int, str]]:
    return {(mib, mode) for mib in plan["sizes"] for mode in plan["modes"]}


def _lazy_slots(plan: dict) -> set[tuple[int, str]]:
    return {(mib, plan["lazy_mode"]) for mib in plan["lazy_sizes"]}


def _lazy_figures(result: dict) -> str:
    if result["method"] != "lazy":
        return ""
    if result["stopped"]:
        return f"; copy stopped, felt read {result['felt_read_after_s']:.1f} s after the restore"
    reads = (f", workload reads {result['touch_during_copy_per_s'] or 0:.0f}/s during the copy vs "
             f"{result['touch_before_per_s']:.0f}/s" if result["touch_per_s"] else ", no reader")
    return f"; every page at {result['every_page_s']:.1f} s, {result['requests']} requests{reads}"


def _machine() -> dict[str, object]:
    return {"kernel": platform.release(), "cpus": os.cpu_count(),
            "memory_GiB": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1),
            "python": platform.python_version(),
            "pipe_max_size": int(Path("/proc/sys/fs/pipe-max-size").read_text())}


__all__ = ["main", "summary"]

if __name__ == "__main__":
    sys.exit(main())
