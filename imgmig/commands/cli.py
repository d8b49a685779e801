"""Command-line entry points: imgmig-proxy, imgmig-cache and the operator's `imgmig`."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Callable

from imgmig import __version__, config
from imgmig.config import Config, ConfigError
from imgmig.system import systemd_glue, tls
from imgmig.system.fdstore import FdStore

log = logging.getLogger("imgmig")

EXIT_CONFIG = 2


def _daemon_main(role: str, build: Callable[[Config], object], argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog=f"imgmig-{role}", description=f"imgmig {role} daemon")
    parser.add_argument("--config", default=config.DEFAULT_PATH, help="YAML config file (%(default)s)")
    parser.add_argument("--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"imgmig {__version__}")
    args = parser.parse_args(argv)
    systemd_glue.setup_logging(f"imgmig-{role}", args.verbose)
    passed = systemd_glue.passed_fds()
    try:
        cfg = config.load(args.config)
        role_object = build(cfg)
        daemon = role_object.daemon  # type: ignore[attr-defined]
        daemon.open_sockets(passed.sockets)
    except ConfigError as exc:
        log.error("%s", exc)
        systemd_glue.notify(f"STATUS=refused to start: {exc}")
        return EXIT_CONFIG
    tls.log_start(role_object.trust, cfg.source)  # type: ignore[attr-defined]
    # Checkpoints kept in systemd's fd store over a restart are back before READY=1.
    taken = FdStore(role_object.store, role).take_back(passed.stored)  # type: ignore[attr-defined]
    if role == "proxy":  # their forwarding resumes, and the cache drops what a cut capture left there
        role_object.resume_after_restart(taken)  # type: ignore[attr-defined]
    return daemon.run()


def proxy_main(argv: list[str] | None = None) -> int:
    from imgmig.roles.proxy import Proxy
    return _daemon_main("proxy", Proxy, argv)


def cache_main(argv: list[str] | None = None) -> int:
    from imgmig.roles.cache import Cache
    return _daemon_main("cache", Cache, argv)


def main(argv: list[str] | None = None) -> int:
    from imgmig.commands import handoff, migrate, pki, restore, status
    from imgmig.commands.common import CommandError, say

    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after `--` is for CRIU (migrate, restore), never for us.
    split = argv.index("--") if "--" in argv else len(argv)
    argv, criu_options = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(prog="imgmig", description="imgmig operator's tool")
    parser.add_argument("--version", action="version", version=f"imgmig {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-config", help="validate a config file and say what it sets")
    check.add_argument("file", nargs="?", default=config.DEFAULT_PATH)
    check.set_defaults(run=lambda args: check_config(args.file))
    pki.add_parser(commands)
    status.add_parsers(commands)
    migrate.add_parser(commands)
    restore.add_parser(commands)
    handoff.add_parser(commands)
    args = parser.parse_args(argv)
    if criu_options and args.command not in ("migrate", "restore"):
        parser.error(f"arguments after -- are for CRIU; `imgmig {args.command}` runs no CRIU")
    args.criu_options = criu_options
    try:
        return args.run(args)
    except CommandError as exc:
        say(str(exc))
        return exc.status
    except KeyboardInterrupt:
        say("interrupted")
        return 130


def check_config(path: str) -> int:
    try:
        cfg = config.load(path)
    except ConfigError as exc:
        print(f"imgmig: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    peer = cfg.proxy.peer or "not set (the proxy role cannot run)"
    if cfg.proxy.peer_node:
        peer = f"{cfg.proxy.peer_node}@{peer} (its certificate must name {cfg.proxy.peer_node})"
    print(f"{path}: valid")
    print(f"  node {cfg.node}; transfer {cfg.transfer}; digest {cfg.digest}; memory limit {cfg.memory_limit} bytes")
    print(f"  proxy: images_dir {cfg.proxy.images_dir}, peer {peer}")
    allow = ", ".join([*(str(net) for net in cfg.cache.allow), *cfg.cache.allow_nodes]) or "nobody"
    print(f"  cache: images_dir {cfg.cache.images_dir}, listen {cfg.cache.listen}, allow {allow}")
    if cfg.peers:
        print("  peers: " + ", ".join(f"{name} {address}" for name, address in cfg.peers))
    print(f"  criu: {shlex.join(cfg.criu)}")
    return check_tls(cfg)


def check_tls(cfg: Config) -> int:
    if cfg.tls is None:
        print("  tls: OFF: any process reaching the cache's port can send it checkpoints and images cross "
              "the network in clear text; use tls: off only in a lab")
        if cfg.cache.allow_nodes:
            print(f"  note: cache.allow names {', '.join(cfg.cache.allow_nodes)}: only a TLS certificate proves a "
                  f"node name, so with tls: off these entries never match")
        return 0
    try:
        identity = tls.load_identity(cfg.tls, cfg.node)
    except ConfigError as exc:
        print(f"imgmig: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"  tls: on; node {identity.node}, certificate {cfg.tls.cert} valid until "
          f"{identity.not_after:%Y-%m-%d} UTC, key {identity.key}, CA {cfg.tls.ca}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
