"""`imgmig migrate PID --to NODE`: checks, `criu dump --stream` into the proxy, progress
from the proxy's control socket, and a rollback from the proxy's copy if the process
does not come up on NODE.

Exit status: 0 running on NODE; 1 failed, and the process runs here (it never left, or
was rolled back); 2 usage or config error, nothing done; 3 the process runs nowhere.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgmig import config
from imgmig.commands.common import (
    EXIT_FAILED,
    EXIT_LOST,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    ControlClient,
    Declined,
    control_path,
    criu_check,
    criu_command,
    criu_tail,
    load_config,
)
from imgmig.commands.files import pack as pack_files
from imgmig.commands.lazy import DumpRunning, LazyDump, dump_lazy
from imgmig.commands.progress import Reporter, Snapshot, make_reporter
from imgmig.commands.restore import restore_claimed
from imgmig.config import Config, peer_address

POLL = 0.25
HEARTBEAT = 5.0  # seconds between progress events when nothing moves
LAZY_RUNNING_WAIT = 5.0  # for the restore's RUNNING after a lazy dump ended (it names the pid)
PROXY_LOST_WAIT = 2.0  # for a lazy dump to end by itself once the proxy is gone
DUMP_EXIT_GRACE = 5.0  # for the dump to exit once its checkpoint ended well at the destination
DEFAULT_TIMEOUT = 300.0
PREPARE_WAIT = 75.0  # for the proxy's `prepare`, which waits up to 60 s for the cache (roles/probe.py)
# Dump options the rollback restore needs as well (CRIU refuses to restore a shell job
# without --shell-job, and so on); options with values are not carried over.
RESTORE_TOO = frozenset({"--shell-job", "-j", "--tcp-established", "--ext-unix-sk", "--file-locks"})


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "migrate", help="move a running process to another node (run on the source)",
        description="Checks the proxy, the cache and CRIU, dumps PID into the proxy, shows the transfer and "
                    "waits until the process runs on NODE; rolls it back here if it does not. Arguments after -- "
                    "go to `criu dump`. Exit: 0 running on NODE, 1 failed and running here, 2 usage or config "
                    "error (nothing done), 3 running nowhere.")
    parser.add_argument("pid", type=int, help="the process (tree) to migrate")
    parser.add_argument("--to", required=True, metavar="NODE", help="destination node: a name in `peers:`, "
                        "or the node name of proxy.peer's cache")
    parser.add_argument("--config", default=config.DEFAULT_PATH, help="YAML config file (%(default)s)")
    parser.add_argument("--criu", metavar="PATH", help="CRIU command (default: `criu:` in the config, else criu)")
    parser.add_argument("--json", action="store_true", help="one JSON event per line on stdout")
    parser.add_argument("--no-rollback", action="store_true", help="on failure, keep the proxy's copy "
                        "instead of restoring the process here")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="how long the destination may take to report the process restored (%(default)s)")
    parser.add_argument("--files", nargs="+", metavar="PATH", default=[],
                        help="files and directories that travel with the process, unpacked at the same paths "
                             "on NODE before the restore")
    parser.add_argument("--lazy", action="store_true",
                        help="post-copy: the process runs on NODE before its memory arrived, which follows from "
                             "here (`migrate.mode: lazy` in the config does the same); NODE restores it with "
                             "`imgmig restore --lazy`")
    parser.set_defaults(run=migrate_command)


@dataclass
class Migration:
    cfg: Config
    pid: int
    node: str
    route: str | None  # the peers-map name the proxy sends to; None: proxy.peer
    criu: list[str]
    options: list[str]
    reporter: Reporter
    timeout: float
    rollback: bool
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="imgmig-migrate-")))
    started: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None
    files: int | None = None  # the sealed memfd of --files, until the proxy has it
    lazy: bool = False
    notes: set[str] = field(default_factory=set)  # what was said once already
    last_seen: dict[str, Any] | None = None  # the checkpoint as the proxy's status last showed it

    def phase(self, name: str) -> None:
        self.phases[name] = round(time.monotonic() - self.started, 3)
        self.reporter.phase(name, self.phases[name])


def migrate_command(args: argparse.Namespace) -> int:
    reporter = make_reporter(args.json)
    try:
        migration = _prepare(args, reporter)
        status, outcome = _run(migration)
    except CommandError as exc:
        if args.json:  # a script reads the outcome from stdout; a person from the one line on stderr
            reporter.finish({"outcome": str(exc), "exit": exc.status, "phases": {}})
        raise
    reporter.finish({"outcome": outcome, "exit": status, "checkpoint": migration.checkpoint,
                     "to": migration.node, "phases": migration.phases, "workdir": str(migration.workdir)})
    return status


def _prepare(args: argparse.Namespace, reporter: Reporter) -> Migration:
    """The checks: nothing is done to the process, and nothing printed but the one line
    of a failure, before all of them pass."""
    cfg = load_config(args.config)
    if args.pid <= 1 or args.pid == os.getpid() or not Path(f"/proc/{args.pid}").exists():
        raise CommandError(f"no process {args.pid} to migrate on this node", EXIT_USAGE)
    criu = criu_command(args.criu, cfg)
    passed = []
    with ControlClient(control_path(cfg, "proxy"), "proxy") as proxy:
        passed.append(("proxy", f"imgmig-proxy answers on {control_path(cfg, 'proxy')}"))
        route, reached, answer = _resolve(cfg, proxy, args.to)
        passed.append(("cache", reached))
        passed.append(("room", _room_for(args.pid, answer)))
    criu_check(criu)
    passed.append(("criu", f"`{shlex.join(criu)} check` passed"))
    lazy = (args.lazy or cfg.migrate_mode == "lazy") and _lazy_possible(criu, reporter)
    if lazy:
        passed.append(("lazy", "userfaultfd works (criu check --feature uffd-noncoop): post-copy"))
    files = None
    if args.files:
        files, size = pack_files(args.files)
        passed.append(("files", f"{len(args.files)} path(s) packed: {size} bytes"))
    for name, detail in passed:
        reporter.check(name, detail)
    return Migration(cfg, args.pid, args.to, route, criu, args.criu_options, reporter, args.timeout,
                     not args.no_rollback, files=files, lazy=lazy)


def _lazy_possible(criu: list[str], reporter: Reporter) -> bool:
    """Post-copy needs userfaultfd as CRIU uses it; without it, say so in one line and copy."""
    done = subprocess.run([*criu, "check", "--feature", "uffd-noncoop"], capture_output=True, text=True)
    if done.returncode == 0:
        return True
    said = (done.stdout + done.stderr).strip().splitlines()
    reporter.message(f"lazy migration is not possible here (criu check --feature uffd-noncoop: "
                     f"{said[-1] if said else 'failed'}); falling back to a full copy")
    return False


def _resolve(cfg: Config, proxy: ControlClient, node: str) -> tuple[str | None, str, dict[str, Any]]:
    """Which cache --to names, and is it reachable: a peers-map name (returned, for the
    proxy's route), or proxy.peer's node (None: the default route); and its probe's answer."""
    if peer_address(cfg, node) is not None:
        reply = _probe(proxy, node)
        return node, f"{node} ({reply['address']}) {_reached(reply)}: its cache is {reply['node']}", reply
    default = cfg.proxy.peer
    aliases = {str(default), default.host} if default is not None else set()
    if cfg.proxy.peer_node is not None:
        aliases.add(cfg.proxy.peer_node)
    known = ", ".join([name for name, _ in cfg.peers] + sorted(aliases)) or "none"
    if default is None:
        raise CommandError(f"unknown node {node!r}: not in the peers map of {cfg.source} (known: {known})",
                           EXIT_USAGE)
    reply = _probe(proxy, None)
    if node not in aliases and node != reply["node"]:
        raise CommandError(f"unknown node {node!r}: not in the peers map of {cfg.source}, and proxy.peer "
                           f"{default} is node {reply['node']!r}; use --to {reply['node']} or add "
                           f"`peers: {{{node}: HOST:PORT}}`", EXIT_USAGE)
    return None, f"{reply['node']} ({reply['address']}) {_reached(reply)}", reply


def _room_for(pid: int, answer: dict[str, Any]) -> str:
    """The process's resident memory must fit in the room the cache said it has: a
    checkpoint that cannot fit would be refused there after the freeze (ERROR 7)."""
    need, room = resident_bytes(pid), answer["room"]
    if need > room:
        raise CommandError(f"process {pid} holds {_mib(need)}, but the cache on {answer['node']} has "
                           f"{_mib(room)} free of its memory.limit of {_mib(answer['memory_limit'])}; "
                           f"nothing done, the process still runs here (free room there, or raise its "
                           f"memory.limit)")
    return f"{_mib(need)} resident, {_mib(room)} free at the cache"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def _reached(reply: dict[str, Any]) -> str:
    """With TLS the probe's HELLO went over an authenticated link: both certificates checked."""
    return "reachable and authenticated (mutual TLS)" if reply.get("authenticated") else "reachable (TLS off)"


def _probe(proxy: ControlClient, node: str | None) -> dict[str, Any]:
    try:
        return proxy.request("probe", **({"to": node} if node else {}))
    except Declined as exc:
        raise CommandError(f"{exc}; nothing done, the process still runs here") from None


def _run(m: Migration) -> tuple[int, str]:
    proxy = ControlClient(control_path(m.cfg, "proxy"), "proxy")
    with proxy:
        estimate = resident_bytes(m.pid)
        if not m.lazy:  # a lazy dump's pages go through the tunnel, into no image
            _ready_memory(m, proxy, estimate)
        ticket = str(proxy.request("expect", fd=m.files, **({"files": True} if m.files is not None else {}),
                                   **({"to": m.route} if m.route else {}))["ticket"])
        if m.files is not None:
            os.close(m.files)  # the proxy holds it now
        if m.lazy:
            return _run_lazy(m, proxy, ticket)
        argv = [*m.criu, "dump", "--stream", "-D", str(m.cfg.proxy.images_dir), "-t", str(m.pid),
                "-o", "dump.log", "-W", str(m.workdir), *m.options]
        m.started = time.monotonic()
        with open(m.workdir / "dump.out", "wb") as out:
            dump = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        m.phase("frozen")
        try:
            return _follow(m, proxy, ticket, dump, estimate)
        except CommandError as exc:  # the proxy went away mid-migration
            dump.wait()
            if Path(f"/proc/{m.pid}").exists():
                return EXIT_FAILED, f"{exc}; the process still runs here"
            return EXIT_LOST, (f"{exc}; process {m.pid} is gone from this node: check `imgmig status` on "
                               f"{m.node}, it may hold checkpoint {m.checkpoint}")


def _ready_memory(m: Migration, proxy: ControlClient, size: int) -> None:
    """Both daemons allocate memory for the pages now, while the process still runs, not
    during the freeze (the proxy's `prepare`). Without it the migration goes on: the
    pages are then allocated as they arrive."""
    try:
        reply = proxy.request("prepare", bytes=size, timeout=PREPARE_WAIT, **({"to": m.route} if m.route else {}))
    except Declined as exc:
        m.reporter.message(f"memory for the pages was not made ready before the freeze ({exc}); going on")
        return
    if reply["proxy"] or reply["cache"]:
        m.reporter.message(f"memory ready before the freeze: {_mib(reply['proxy'])} here, {_mib(reply['cache'])} "
                           f"on {m.node} ({reply['seconds']:.1f} s)")


def _follow(m: Migration, proxy: ControlClient, ticket: str, dump: subprocess.Popen[bytes],
            estimate: int) -> tuple[int, str]:
    """Poll the proxy until the process runs on the destination, or fails somewhere."""
    deadline: float | None = None
    shown: tuple[int, int, int] | None = None
    shown_at = 0.0
    while True:
        finished = dump.poll() is not None  # before the status: a finished dump's checkpoint is in it
        status = proxy.request("status")
        m.checkpoint = m.checkpoint or status["tickets"].get(ticket)
        live, ended = _find(status, m.checkpoint)
        if ended is not None and not finished and ended["state"] != "failed":
            # a restore there may end as soon as CRIU's dump closed its socket, before the dump exits
            finished = _exited(dump, DUMP_EXIT_GRACE)
        if live is not None:
            m.last_seen = live
            counts = (live["bytes"], live["forwarded"], live["verified"])
            if counts != shown or time.monotonic() - shown_at >= HEARTBEAT:
                m.reporter.progress(_snapshot(m, live, estimate))
                shown, shown_at = counts, time.monotonic()
        if finished and "dump done" not in m.phases:
            if dump.returncode != 0:
                return _dump_failed(m, dump.returncode)
            if m.checkpoint is None:  # never guess which checkpoint to restore
                return _unseen(m)
            m.phase("dump done")
            deadline = time.monotonic() + m.timeout
        if live is not None and live.get("delivered") and "dump done" in m.phases \
                and "verified at the destination" not in m.phases:
            m.phase("verified at the destination")
        if ended is not None and (finished or ended["state"] != "failed"):  # a failed capture: criu's exit first
            return _ended(m, ended)
        if live is not None and live.get("restored_at_peer") and "read whole at the destination" not in m.notes:
            # a bare restore there: only its own confirmation (RUNNING) says the process runs
            m.notes.add("read whole at the destination")
            m.reporter.message(f"a restore on {m.node} read every image; waiting for it to confirm the process runs")
        if live is not None and live.get("returned") and "dump done" in m.phases:
            return _fail_over(m, proxy, f"the restore on {m.node} failed and gave the right to restore back")
        if live is not None and live["link"] == "closed" and "dump done" in m.phases:
            return _fail_over(m, proxy, live["outcome"] or "the link to the cache closed")
        if deadline is not None and time.monotonic() > deadline:
            if "read whole at the destination" in m.notes:
                return _unconfirmed(m)
            return _fail_over(m, proxy, f"the destination did not report the process restored within "
                                        f"{m.timeout:.0f} s")
        time.sleep(POLL)


def _run_lazy(m: Migration, proxy: ControlClient, ticket: str) -> tuple[int, str]:
    """Post-copy (commands/lazy.py): the process is gone from here once its last page went,
    and runs here again if the dump fails (CRIU resumes it), so there is nothing to roll back."""
    m.started = time.monotonic()
    m.phase("frozen")
    try:
        dump = dump_lazy(m.criu, m.pid, proxy, m.cfg.proxy.images_dir, ticket=int(ticket), images_dir=m.workdir,
                         options=m.options)
    except DumpRunning as exc:  # the proxy went away as the copy began
        return _proxy_lost(m, exc.dump, str(exc))
    except CommandError as exc:
        return (EXIT_FAILED if Path(f"/proc/{m.pid}").exists() else EXIT_LOST), str(exc)
    m.checkpoint = dump.checkpoint
    m.phase("dump done")
    try:
        started = _follow_lazy(m, proxy, dump)
    except CommandError as exc:  # the proxy went away mid-copy
        return _proxy_lost(m, dump, str(exc))
    if not started:
        dump.abort()
        return EXIT_FAILED, (f"no lazy restore on {m.node} fetched a page of checkpoint {m.checkpoint} within "
                             f"{m.timeout:.0f} s (is `imgmig restore` running there, or cache.restore: auto?); the "
                             f"lazy dump was stopped and the process runs here again")
    if dump.proc.returncode != 0:
        return _dump_failed(m, dump.proc.returncode)
    m.phase("every page sent")
    m.phase("running on the destination")
    # the dump ends only after `criu restore -d` returned 0 there (lazy_running): it runs; the
    # restore's RUNNING (lazy_done) names its pid a moment later
    outcome = f"every page of checkpoint {m.checkpoint} went there (post-copy)"
    deadline = time.monotonic() + LAZY_RUNNING_WAIT
    while time.monotonic() < deadline:
        _, ended = _find(proxy.request("status"), m.checkpoint)
        if ended is not None and ended["state"] == "running-at-peer":
            outcome += f"; {ended['outcome']}"
            break
        time.sleep(POLL)
    return EXIT_OK, f"running on {m.node}: {outcome}"


def _follow_lazy(m: Migration, proxy: ControlClient, dump: LazyDump) -> bool:
    """Show the background copy until the dump ends; False if no page went within the
    timeout (the dump still runs then)."""
    shown_at, shown, seen = 0.0, -1, -1
    deadline = time.monotonic() + m.timeout
    while dump.proc.poll() is None:
        if seen <= 0 and time.monotonic() > deadline:
            return False
        live, _ = _find(proxy.request("status"), m.checkpoint)
        if live is not None and live.get("delivered") and "verified at the destination" not in m.phases:
            m.phase("verified at the destination")
        if live is not None:
            seen = live["pages_sent"]
        if seen != shown and time.monotonic() - shown_at >= HEARTBEAT / 5:
            shown, shown_at = seen, time.monotonic()
            _show_copied(m, shown)
        time.sleep(POLL)
    dump.wait()
    if seen != shown:  # the copy ended before the next message was due: its last figure
        _show_copied(m, seen)
    return True


def _show_copied(m: Migration, sent: int) -> None:
    m.reporter.message(f"background copy: {_mib(sent)} of memory sent to {m.node}")


def _proxy_lost(m: Migration, dump: LazyDump, why: str) -> tuple[int, str]:
    """The proxy died (or restarted) during the background copy: no page can reach the
    destination any more, whose restore fails and kills its copy. Unless the dump ends by
    itself at once (the last page had gone), it is killed: the process runs on here."""
    try:
        code = dump.wait(PROXY_LOST_WAIT)
    except subprocess.TimeoutExpired:
        code = dump.abort()
    if code == 0:
        return EXIT_OK, f"running on {m.node}: every page of checkpoint {m.checkpoint} went there before {why}"
    if Path(f"/proc/{m.pid}").exists():
        return EXIT_FAILED, (f"{why} during the background copy; the lazy dump was stopped and the process runs "
                             f"here again (its copy on {m.node} dies with its incomplete memory)")
    return _dump_failed(m, code)


def _exited(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def _find(status: dict[str, Any], checkpoint: str | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    if checkpoint is None:
        return None, None
    live = next((c for c in status["checkpoints"] if c["id"] == checkpoint), None)
    ended = next((c for c in status["ended"] if c["id"] == checkpoint), None)
    return live, ended


def _snapshot(m: Migration, live: dict[str, Any], estimate: int) -> Snapshot:
    elapsed = time.monotonic() - m.started
    total = live["bytes"] if "dump done" in m.phases else max(estimate, live["bytes"])
    rate = live["forwarded"] / elapsed if elapsed > 0 else 0.0
    eta = (total - live["forwarded"]) / rate if rate > 0 else None
    return Snapshot(m.checkpoint or "", round(elapsed, 3), live["bytes"], live["forwarded"], live["verified"],
                    total, rate, eta)


def _ended(m: Migration, ended: dict[str, Any]) -> tuple[int, str]:
    if ended["state"] == "running-at-peer":  # the restore there confirmed it (RUNNING)
        if "verified at the destination" not in m.phases:
            # a restore there reads only verified images: the poll missed the short window between
            m.phase("verified at the destination")
        seen = m.last_seen
        if seen is not None:  # the proxy let go before a poll saw it all: the ended entry counts it
            total = ended.get("bytes") or seen["bytes"]
            if seen["verified"] < total:
                m.reporter.progress(_snapshot(m, seen | {"bytes": total, "forwarded": total, "verified": total}, 0))
        m.phase("running on the destination")
        return EXIT_OK, f"running on {m.node}: {ended['outcome']}"
    if ended["state"] == "restored-at-peer":
        return _unconfirmed(m)
    if ended["state"] in ("restored", "running"):
        return EXIT_FAILED, "restored on this node by another restore (a rollback); it runs here"
    return EXIT_LOST, (f"checkpoint {m.checkpoint} {ended['state']} on the proxy ({ended['outcome']}) after the "
                       f"dump: the process runs nowhere; check `imgmig status` on {m.node}, and the CRIU logs in "
                       f"{m.workdir}")


def _unconfirmed(m: Migration) -> tuple[int, str]:
    """A restore there read every image but never said whether CRIU succeeded (a bare
    `criu restore --stream`): the right stays there, so no rollback here."""
    return EXIT_LOST, (f"a restore on {m.node} read every image of checkpoint {m.checkpoint} but did not confirm "
                       f"that the process runs (a bare `criu restore --stream`? `imgmig restore` confirms it): "
                       f"check on {m.node}; the right to restore it stays there, and this node keeps its copy "
                       f"for proxy.keep_restored_for")


def _dump_failed(m: Migration, code: int) -> tuple[int, str]:
    log = m.workdir / "dump.log"
    if Path(f"/proc/{m.pid}").exists():
        return EXIT_FAILED, (f"criu dump failed ({code}): {criu_tail(m.workdir, 'dump')}; the process still runs "
                             f"here (log: {log})")
    return EXIT_LOST, (f"criu dump failed ({code}) and process {m.pid} is gone: it runs nowhere; "
                       f"see {log}")


def _unseen(m: Migration) -> tuple[int, str]:
    why = "criu dump ended, but the proxy took no checkpoint for it (was another dump running at the same time?)"
    if Path(f"/proc/{m.pid}").exists():
        return EXIT_FAILED, f"{why}; the process still runs here"
    return EXIT_LOST, f"{why}; process {m.pid} is gone: see `imgmig list` and the CRIU logs in {m.workdir}"


def _fail_over(m: Migration, proxy: ControlClient, why: str) -> tuple[int, str]:
    m.reporter.message(f"migration failed: {why}")
    if not m.rollback:
        return EXIT_LOST, (f"{why}; --no-rollback: the proxy keeps checkpoint {m.checkpoint}; run it here with "
                           f"`imgmig restore --rollback --id {m.checkpoint}`")
    m.reporter.message(f"rolling back: restoring checkpoint {m.checkpoint} from the proxy's copy")
    try:
        claimed = proxy.request("claim", id=m.checkpoint)["claimed"]
    except Declined as exc:
        return EXIT_LOST, f"{why}; rollback impossible: {exc}"
    if claimed is None:
        return EXIT_LOST, f"{why}; rollback impossible: the proxy no longer holds checkpoint {m.checkpoint}"
    options = [option for option in m.options if option in RESTORE_TOO]
    result = restore_claimed(proxy, claimed, m.criu, options, m.workdir)
    if result.pid is None:
        return EXIT_LOST, (f"{why}; the rollback failed too: {result.error}; the proxy may still hold checkpoint "
                           f"{m.checkpoint} (`imgmig list`)")
    m.phase("rolled back")
    return EXIT_FAILED, (f"{why}; rolled back: the process runs here again as pid {result.pid}; if {m.node} "
                         f"still lists checkpoint {m.checkpoint}, drop it there (`imgmig drop {m.checkpoint}`)")


def resident_bytes(pid: int) -> int:
    """The process's resident memory: about what its pages will weigh, for an ETA."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
