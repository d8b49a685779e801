"""One-line summaries of what a daemon holds, for STATUS= and logs.

STATUS= is what `systemctl status` shows an operator first, so it says what is held,
how far the limit is, and what the link is doing right now (with a rate).
"""

from __future__ import annotations

import threading
import time
from collections import Counter

from imgmig.datapath.store import ImageStore, State

RATE_WINDOW = 4.0  # seconds of history behind a rate: steady, yet current


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def human_rate(bytes_per_second: float) -> str:
    if bytes_per_second >= 1e9:
        return f"{bytes_per_second / 1e9:.2f} GB/s"
    return f"{bytes_per_second / 1e6:.0f} MB/s"


class RateMeter:
    """The rate of a monotonic byte counter over the last few seconds."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self.samples: list[tuple[float, int]] = []
        self.lock = threading.Lock()

    def rate(self, total: int, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self.lock:
            self.samples.append((now, total))
            while len(self.samples) > 2 and now - self.samples[1][0] >= self.window:
                self.samples.pop(0)
            first_t, first_total = self.samples[0]
        elapsed = now - first_t
        return (total - first_total) / elapsed if elapsed > 0 else 0.0


def describe_store(store: ImageStore) -> str:
    """E.g. `2 checkpoints (1 receiving), 1.3 GiB held of 12.0 GiB, 1.0 GiB ready for the
    next pages` (memfds kept for reuse, or prepared for a coming checkpoint)."""
    checkpoints = store.checkpoints()
    count = len(checkpoints)
    noun = "checkpoint" if count == 1 else "checkpoints"
    states = Counter(checkpoint.state for checkpoint in checkpoints)
    busy = [f"{states[state]} {state.value}" for state in (State.RECEIVING,) if states[state]]
    claimed = sum(1 for checkpoint in checkpoints if checkpoint.claimed)
    if claimed:
        busy.append(f"{claimed} being restored")
    detail = f" ({', '.join(busy)})" if busy else ""
    ready = f", {human_bytes(store.pool.held)} ready for the next pages" if store.pool.held else ""
    return f"{count} {noun}{detail}, {human_bytes(store.held)} held of {human_bytes(store.limit)}{ready}"
