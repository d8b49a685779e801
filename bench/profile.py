"""Profile both daemons during one real imgmig migration (not part of `make bench`):

    python3 -m bench.profile --tool perf   --mib 1024 --out DIR   # Debian's linux-perf
    python3 -m bench.profile --tool py-spy --mib 1024 --out DIR   # py-spy from PyPI

with `--method imgmig-tls-off` for the `tls: off` pair.

perf: one system-wide `perf record -a -g` over the migration, then `perf report
--no-children` (self time by symbol, kernel and user) for each daemon's pid and for the
CRIU processes: the restore of the pages (done in the task being recreated, under the
workload's pid) apart from the rest (dump, restore's main process; on a shared machine
"criu-other" also catches other users' CRIU runs). py-spy: `py-spy record -f raw` on each daemon,
then self time by Python line. Each profiler runs in its own migration, so neither
skews the other, and from the freeze until the process runs again: `prepare`'s
allocation before the freeze is not in it. The top of each profile goes to
DIR/<tool>-<daemon>.txt.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from testbed import criu as testbed_criu
from testbed import migrate, netns

from .realcriu import RealBench

# CRIU runs through the trixie tree's dynamic loader here, so its processes are named after it
CRIU_COMMS = ("criu", "ld-linux")
_PERF_LINE = re.compile(r"^\s*(?P<comm>\S+)\s+(?P<tgid>\d+)/\d+\s+[0-9a-f]+\s+(?P<sym>.+?)\s+\((?P<dso>[^)]*)\)\s*$")
PY_SPY = os.environ.get("PY_SPY", "/var/cache/imgmig-testbed/pyspy-venv/bin/py-spy")


def _start(tool: str, pid: int | None, out: Path) -> subprocess.Popen:
    if tool == "perf":
        argv = ["perf", "record", "-a", "-g", "-F", "999", "-o", str(out)]
    else:
        argv = [PY_SPY, "record", "--nonblocking", "-r", "200", "-f", "raw", "-p", str(pid), "-o", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    time.sleep(1.0)  # let the profiler attach before the dump starts
    return proc


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return err.decode(errors="replace")


def _perf_top(data: Path, keep: Callable[[str, int], bool], lines: int) -> str:
    """Self time by symbol of the samples whose (comm, tgid) `keep` selects; percentages
    are of the selected samples. (`perf report --pid` keeps only a process's main thread.)"""
    done = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,pid,tid,ip,sym,dso", "-G"],
                          capture_output=True, text=True, check=True)
    symbols: collections.Counter[str] = collections.Counter()
    for line in done.stdout.splitlines():
        match = _PERF_LINE.match(line)
        if match and keep(match["comm"], int(match["tgid"])):
            kind = "k" if "kernel" in match["dso"] else "."
            symbols[f"[{kind}] {match['sym']} ({Path(match['dso']).name})"] += 1
    total = sum(symbols.values()) or 1
    rows = [f"{100 * n / total:5.1f}%  {symbol}" for symbol, n in symbols.most_common(lines)]
    return "\n".join([f"# {total} samples (cpu-clock, 999 Hz)", *rows])


def _pyspy_top(raw: Path, lines: int) -> str:
    """Self samples by leaf frame ("function (file:line)") from py-spy's collapsed stacks."""
    leaves: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        leaves[stack.split(";")[-1]] += int(count)
    total = sum(leaves.values()) or 1
    rows = [f"{100 * n / total:5.1f}%  {frame}" for frame, n in leaves.most_common(lines)]
    return "\n".join([f"# {total} samples", *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.profile", description=__doc__.split("\n")[0])
    parser.add_argument("--tool", choices=("perf", "py-spy"), required=True)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--mode", choices=("cold", "warm"), default="warm")
    parser.add_argument("--method", choices=("imgmig", "imgmig-tls-off"), default="imgmig",
                        help="the TLS-on pair (as shipped) or the tls: off one (issue 11's targets)")
    parser.add_argument("--lines", type=int, default=25)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if shutil.which("perf" if args.tool == "perf" else PY_SPY) is None:
        print(f"bench.profile: {args.tool} is not installed (see bench/README.md)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="imgmig-p-"))
    try:
        migrate.become_subreaper()
        with netns.two_nodes("imgmig-prof") as nodes, \
                RealBench(testbed_criu.find_criu(), nodes, workdir, lambda m: print(m, flush=True)) as bench:
            pids = bench.daemon_pids(args.method)
            data = args.out / "perf.data"
            raw = {name: args.out / f"py-spy-{name}.raw" for name in pids}
            profilers: dict[str, subprocess.Popen] = {}
            errors: dict[str, str] = {}

            def start() -> None:  # after prepare, which allocates before the freeze (not profiled)
                if args.tool == "perf":
                    profilers["system"] = _start("perf", None, data)
                else:
                    profilers.update({name: _start("py-spy", pid, raw[name]) for name, pid in pids.items()})

            bench.on_freeze = start
            bench.on_running = lambda: errors.update({name: _stop(proc) for name, proc in profilers.items()})
            result = bench.run(args.method, args.mib, args.mode)
        print(f"migration: freeze-to-running {result['total_s']:.2f} s, dump {result['dump_s']:.2f} s, "
              f"felt {result['felt_gap_s']:.2f} s; load {os.getloadavg()}")
        if args.tool == "perf":
            tops = {name: _perf_top(data, lambda _, tgid, pid=pid: tgid == pid, args.lines)
                    for name, pid in pids.items()}
            task = int(result["pid"])  # CRIU restores the pages in the task it recreates, under this pid
            tops["criu-restore"] = _perf_top(data, lambda comm, tgid: comm.startswith(CRIU_COMMS) and tgid == task,
                                             args.lines)
            tops["criu-other"] = _perf_top(data, lambda comm, tgid: comm.startswith(CRIU_COMMS) and tgid != task,
                                           args.lines)
        else:
            tops = {name: _pyspy_top(raw[name], args.lines) for name in pids}
        for name, top in tops.items():
            (args.out / f"{args.tool}-{name}.txt").write_text(top + "\n")
            print(f"== {args.tool} {name}\n{top}")
        for name, err in errors.items():
            print(f"-- {name} profiler said: {err[-300:]}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
