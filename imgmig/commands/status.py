"""`imgmig status`, `imgmig list` and `imgmig drop ID`: what this node's daemons hold."""

from __future__ import annotations

import argparse
import json
from typing import Any

from imgmig import config
from imgmig.commands.common import (
    EXIT_FAILED,
    ROLES,
    CommandError,
    ControlClient,
    DaemonDown,
    Declined,
    control_path,
    load_config,
    nothing_running,
    query_all,
)
from imgmig.roles.status import human_bytes, human_rate


def add_parsers(commands: argparse._SubParsersAction) -> None:
    status = commands.add_parser("status", help="what this node's daemons hold, their links and last error")
    status.add_argument("--config", default=config.DEFAULT_PATH, help="YAML config file (%(default)s)")
    status.add_argument("--json", action="store_true", help="print the daemons' answers as one JSON object")
    status.set_defaults(run=status_command)
    listing = commands.add_parser("list", help="the checkpoints this node's daemons hold")
    listing.add_argument("--config", default=config.DEFAULT_PATH, help="YAML config file (%(default)s)")
    listing.add_argument("--json", action="store_true", help="print them as JSON")
    listing.set_defaults(run=list_command)
    drop = commands.add_parser("drop", help="discard a checkpoint (refused for a copy still needed, unless --force)")
    drop.add_argument("id", help="the checkpoint's id, as `imgmig list` shows it")
    drop.add_argument("--force", action="store_true", help="drop even the only copy of an unconfirmed migration")
    drop.add_argument("--config", default=config.DEFAULT_PATH, help="YAML config file (%(default)s)")
    drop.set_defaults(run=drop_command)


def _ask_both(args: argparse.Namespace, op: str) -> dict[str, Any] | None:
    """Each daemon's reply to `op` (None where it is not running); printed and None with --json."""
    cfg = load_config(args.config)
    replies = query_all(cfg, op)
    if not any(replies.values()):
        raise nothing_running(cfg)
    if args.json:
        print(json.dumps(replies, indent=2))
        return None
    return replies


def status_command(args: argparse.Namespace) -> int:
    replies = _ask_both(args, "status")
    if replies is None:
        return 0
    for role in ROLES:
        reply = replies[role]
        if reply is None:
            print(f"imgmig-{role}: not running")
            continue
        print(f"imgmig-{role} on {reply['node']} (pid {reply['pid']}, up {_duration(reply['uptime'])}): "
              f"{reply['summary']}")
        _print_checkpoints(reply, "  ")
        for peer in reply["peers"]:
            print(f"  peer {_describe_peer(peer)}")
        error = reply.get("last_error")
        print(f"  last error: {error['message']} ({_duration(error['ago'])} ago)" if error else "  last error: none")
    return 0


def list_command(args: argparse.Namespace) -> int:
    replies = _ask_both(args, "list")
    if replies is None:
        return 0
    for role in ROLES:
        reply = replies[role]
        if reply is not None:
            print(f"imgmig-{role}:")
            _print_checkpoints(reply, "  ")
    return 0


def drop_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    reached = False
    for role in ROLES:
        try:
            with ControlClient(control_path(cfg, role), role) as client:
                reached = True
                held = [c["id"] for c in client.request("list")["checkpoints"]]
                if args.id not in held:
                    continue
                try:
                    client.request("drop", id=args.id, force=args.force)
                except Declined as exc:
                    raise CommandError(f"imgmig-{role}: {exc}", EXIT_FAILED) from None
                print(f"imgmig-{role}: checkpoint {args.id} dropped")
                return 0
        except DaemonDown:
            continue
    if not reached:
        raise nothing_running(cfg)
    raise CommandError(f"no daemon on this node holds checkpoint {args.id}; `imgmig list` shows what they hold")


def _print_checkpoints(reply: dict[str, Any], indent: str) -> None:
    held, ended = reply["checkpoints"], reply["ended"]
    if not held and not ended:
        print(f"{indent}no checkpoints")
    for checkpoint in held:
        detail = []
        if checkpoint.get("claimed"):
            detail.append("being restored")
        if checkpoint.get("right"):
            detail.append(f"right to restore held by {checkpoint['right']}")
        if "forwarded" in checkpoint:
            detail.append(f"forwarded {human_bytes(checkpoint['forwarded'])}, link {checkpoint['link']}")
        if checkpoint.get("outcome"):
            detail.append(checkpoint["outcome"])
        print(f"{indent}{checkpoint['id']}  {checkpoint['state']:<9} {human_bytes(checkpoint['bytes']):>10}  "
              f"age {_duration(checkpoint['age']):>6}  from {checkpoint['origin']}"
              + (f"; {'; '.join(detail)}" if detail else ""))
    for entry in ended:
        outcome = f"; {entry['outcome']}" if entry["outcome"] else ""
        print(f"{indent}{entry['id']}  {entry['state']:<9} {human_bytes(entry['bytes']):>10}  "
              f"ended {_duration(entry['ended_ago'])} ago{outcome}")


def _describe_peer(peer: dict[str, Any]) -> str:
    name = peer["name"]
    if "address" in peer:
        name = f"{name} {peer['address']}" + (f" = {peer['node']}" if peer.get("node") else "")
    text = f"{name}: {peer['state']}"
    if peer.get("rate"):
        text += f" at {human_rate(peer['rate'])}"
    if "ago" in peer:
        text += f", last seen {_duration(peer['ago'])} ago"
    return text


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
