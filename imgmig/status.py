"""One-line summaries of what a daemon holds, for STATUS= and logs."""

from __future__ import annotations

from .store import ImageStore


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def describe_store(store: ImageStore) -> str:
    checkpoints = store.checkpoints()
    count = len(checkpoints)
    noun = "checkpoint" if count == 1 else "checkpoints"
    return f"{count} {noun}, {human_bytes(store.held)} held of {human_bytes(store.limit)}"
