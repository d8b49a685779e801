"""`imgmig handoff --force ID`, on the destination: fencing. When the source node is dead,
no proxy can grant the right to restore a checkpoint; the operator, having made sure the
source is down, takes that right on this node's cache (docs/control.md, "Fencing")."""

from __future__ import annotations

import argparse

from imgmig import config
from imgmig.commands.common import EXIT_FAILED, CommandError, ControlClient, control_path, load_config
from imgmig.datapath.custody import not_fenced


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "handoff", help="take the right to restore a checkpoint on this node's cache when its source is dead (fencing)",
        description="On the destination, when the source node is down and cannot grant the right to restore a "
                    "checkpoint: take that right on this node's cache, so that the restore waiting for it, or the "
                    "next one, proceeds. Refused without --force, which is how the operator says the source node "
                    "is powered off or fenced.")
    parser.add_argument("id", help="the checkpoint's id, as `imgmig list` shows it")
    parser.add_argument("--force", action="store_true",
                        help="I have made sure the source node is down (powered off or fenced)")
    parser.add_argument("--config", default=config.DEFAULT_PATH, help="YAML config file (%(default)s)")
    parser.set_defaults(run=handoff_command)


def handoff_command(args: argparse.Namespace) -> int:
    if not args.force:
        raise CommandError(not_fenced(args.id), EXIT_FAILED)
    cfg = load_config(args.config)
    with ControlClient(control_path(cfg, "cache"), "cache") as cache:
        reply = cache.request("handoff", id=args.id, force=True)
    if reply["already"]:
        print(f"checkpoint {args.id}: this node holds the right to restore it already")
    else:
        print(f"checkpoint {args.id}: the right to restore it is this node's now (fencing); a restore waiting for "
              f"it proceeds, or run `imgmig restore --id {args.id}`")
    return 0
