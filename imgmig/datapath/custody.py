"""Who may restore a checkpoint: the right that makes a migration exactly-once.

The proxy is the one place that decides (docs/protocol.md, "Handoff"). A rollback on
the source takes the right directly from its store; the cache asks for it (CLAIM) on
the checkpoint's connection and serves nothing before the proxy granted it. Both
sides keep the answer in the checkpoint (`holder`, `refused_by`) under the store's
condition, so a serve thread and a link driver meet there without calling each other.
The one exception is fencing: with the source node down, the operator takes the right
on the cache (`imgmig handoff --force`, `force`); the cache tells the proxy if it comes back.
Under systemd the proxy acts on a grant or a rollback only once its fd store recorded the
new holder (`ImageStore.wait_durable`), so a restart never forgets a right it gave.
"""

from __future__ import annotations

import logging
import threading

from imgmig.datapath.store import DURABLE_TIMEOUT, Checkpoint, CheckpointFailed, ImageStore, State

log = logging.getLogger(__name__)


def source(node: str) -> str:
    """How the right is named when a rollback on the source node holds it."""
    return f"{node} (the source, rollback)"


def destination(node: str) -> str:
    """How the right is named when the cache on the destination node holds it."""
    return f"{node} (the destination)"


class NoRight(Exception):
    """The restore may not have this checkpoint; the text names who holds the right."""


def take_for_rollback(store: ImageStore, checkpoint: Checkpoint, node: str) -> None:
    """Proxy: a restore on this node takes the right, unless the cache was granted it."""
    with store.cond:
        if checkpoint.holder and checkpoint.holder != source(node):
            raise NoRight(f"the right to restore it is held by {checkpoint.holder}, which was granted it")
        checkpoint.holder = source(node)
        store.changed()
    _make_durable(store, checkpoint, "taken for a restore on this node")


def grant_to_peer(store: ImageStore, checkpoint: Checkpoint, peer: str) -> tuple[bool, str]:
    """Proxy: answer the cache's CLAIM from node `peer`. Returns (granted, holder)."""
    with store.cond:
        if checkpoint.holder and checkpoint.holder != destination(peer):
            return False, checkpoint.holder
        checkpoint.holder = destination(peer)
        store.changed()
    _make_durable(store, checkpoint, f"granted to {destination(peer)}")
    return True, destination(peer)


def _make_durable(store: ImageStore, checkpoint: Checkpoint, what: str) -> None:
    """Act on a change of holder only once a restart of this daemon would remember it: a
    proxy killed right after a GRANT must not come back believing it may roll back."""
    if not store.wait_durable():
        log.error("checkpoint %s: the right to restore it was %s, but systemd's fd store has not recorded it "
                  "after %.0f s; if this daemon is restarted now, it may forget who holds the right: check "
                  "`journalctl -u imgmig-proxy` for fd store errors", checkpoint.id, what, DURABLE_TIMEOUT,
                  extra={"IMGMIG_CHECKPOINT": checkpoint.id})


def await_grant(store: ImageStore, checkpoint: Checkpoint, timeout: float, stop: threading.Event) -> None:
    """Cache: ask for the right (the link driver sends CLAIM) and wait for the answer."""
    with store.cond:
        if checkpoint.holder:
            return
        checkpoint.grant_wanted = True
        store.changed()
    answered = store.wait_until(lambda: checkpoint.holder or checkpoint.refused_by
                                or checkpoint.state is State.FAILED, stop, timeout)
    with store.cond:
        checkpoint.grant_wanted = False
        if checkpoint.holder:
            return
        if checkpoint.state is State.FAILED:
            raise CheckpointFailed(f"checkpoint {checkpoint.id} failed: {checkpoint.reason}")
        refused_by, checkpoint.refused_by = checkpoint.refused_by, ""
    if refused_by:
        raise NoRight(f"the right to restore it is held by {refused_by}")
    if not answered and not stop.is_set():
        raise NoRight(f"its source did not grant the right to restore it within {timeout:g} s "
                      f"(cache.grant_timeout); the link to it may be down")
    raise NoRight("the daemon is stopping")


def answer_claim(store: ImageStore, checkpoint: Checkpoint, granted: bool, holder: str) -> None:
    """Cache: the proxy's GRANT arrived."""
    with store.cond:
        checkpoint.grant_wanted = False  # answered: the link driver must not ask again
        if granted:
            checkpoint.holder = holder
        else:  # a right this node held by `handoff --force` is void too: the source restored it itself
            checkpoint.holder, checkpoint.forced, checkpoint.refused_by = "", False, holder
        store.changed()


def give_back(store: ImageStore, checkpoint: Checkpoint, timeout: float, stop: threading.Event) -> bool:
    """Cache: a restore here that held the right failed; the link driver returns the right
    to the proxy (RETURN), and this copy stays for a retry. False if no link took it within
    timeout: then this node keeps the right too."""
    with store.cond:
        if not checkpoint.holder:
            return False
        checkpoint.return_wanted = True
        store.changed()
    store.wait_until(lambda: not checkpoint.holder, stop, timeout)
    with store.cond:  # the flag goes under the lock the driver takes it with: returned, or kept, never both
        checkpoint.return_wanted = False
        return not checkpoint.holder


def take_return(store: ImageStore, checkpoint: Checkpoint) -> bool:
    """Cache, the link driver: take the wish to return the right; True means send RETURN now
    (this node no longer holds the right)."""
    with store.cond:
        if not (checkpoint.return_wanted and checkpoint.holder):
            return False
        checkpoint.return_wanted = False
        checkpoint.holder = ""
        store.changed()
        return True


def taken_back(store: ImageStore, checkpoint: Checkpoint, peer: str) -> None:
    """Proxy: the cache on node `peer` returned the right (its restore failed): nobody
    holds the right, and this copy is kept for a rollback (no longer evicted for memory)."""
    with store.cond:
        if checkpoint.holder == destination(peer):
            checkpoint.holder = ""
        checkpoint.delivered = False
        store.changed()


def not_fenced(checkpoint_id: str) -> str:
    """Why `imgmig handoff` without --force is refused: the one line both the command and the cache say."""
    return (f"checkpoint {checkpoint_id} not handed over: its source node's proxy grants the right to restore it, and "
            f"taking it here without that is safe only once the source node is down (powered off or fenced, so that "
            f"it cannot roll back): make sure of that first, then say so with `imgmig handoff --force "
            f"{checkpoint_id}`")


def force(store: ImageStore, checkpoint: Checkpoint, node: str) -> None:
    """Cache: `imgmig handoff --force` (fencing): this node takes the right without its
    source's proxy, which the operator says is down; a restore waiting for a GRANT goes on."""
    with store.cond:
        checkpoint.holder = destination(node)
        checkpoint.forced = True
        checkpoint.refused_by = ""
        checkpoint.grant_wanted = False
        store.changed()


def used_at_peer(store: ImageStore, checkpoint: Checkpoint, peer: str) -> str:
    """Proxy: a restore on the cache of node `peer` read the checkpoint (RESTORED, RUNNING):
    the right was used there, granted here or taken by `imgmig handoff --force` while this
    node was unreachable. Records it, so that no rollback follows; returns the holder before."""
    with store.cond:
        before = checkpoint.holder
        if not before:
            checkpoint.holder = destination(peer)
            store.changed()
        return before
