"""How `imgmig migrate` shows what happens: a rich progress bar on a terminal, plain lines
otherwise, or one JSON object per line (--json) for scripts."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from imgmig.roles.status import human_bytes, human_rate

PLAIN_EVERY = 1.0  # seconds between plain progress lines


@dataclass(frozen=True)
class Snapshot:
    checkpoint: str
    t: float  # seconds since the dump started
    captured: int
    forwarded: int
    verified: int
    total: int  # estimated until the dump is done
    rate: float  # forwarded bytes per second
    eta: float | None


class Reporter:
    """Plain lines on stderr; the base for the other two."""

    def __init__(self) -> None:
        self.last_line = 0.0

    def check(self, name: str, detail: str) -> None:
        self.message(f"check {name}: ok, {detail}")

    def phase(self, name: str, t: float) -> None:
        self.message(f"{t:8.3f} s  {name}")

    def progress(self, snapshot: Snapshot) -> None:
        now = time.monotonic()
        if now - self.last_line >= PLAIN_EVERY:
            self.last_line = now
            self.message(describe(snapshot))

    def message(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def finish(self, result: dict[str, Any]) -> None:
        phases = result.get("phases") or {}
        if phases:
            self.message("phases (seconds since the freeze): " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()))
        self.message(f"outcome (exit {result['exit']}): {result['outcome']}")


def describe(snapshot: Snapshot) -> str:
    eta = f", ETA {snapshot.eta:.0f} s" if snapshot.eta is not None else ""
    return (f"captured {human_bytes(snapshot.captured)}, forwarded {human_bytes(snapshot.forwarded)}, "
            f"verified {human_bytes(snapshot.verified)} of ~{human_bytes(snapshot.total)} at "
            f"{human_rate(snapshot.rate)}{eta}")


class JsonReporter(Reporter):
    def _event(self, kind: str, **fields: Any) -> None:
        print(json.dumps({"event": kind, **fields}), flush=True)

    def check(self, name: str, detail: str) -> None:
        self._event("check", name=name, ok=True, detail=detail)

    def phase(self, name: str, t: float) -> None:
        self._event("phase", phase=name, t=t)

    def progress(self, snapshot: Snapshot) -> None:
        self._event("progress", **asdict(snapshot))

    def message(self, text: str) -> None:
        self._event("message", text=text)

    def finish(self, result: dict[str, Any]) -> None:
        self._event("result", **result)


class RichReporter(Reporter):
    """A progress bar of forwarded bytes, with captured and verified beside it."""

    def __init__(self) -> None:
        super().__init__()
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                            TextColumn("{task.fields[detail]}"), TimeRemainingColumn(), console=self.console,
                            transient=False)
        self.task: Any = None

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def progress(self, snapshot: Snapshot) -> None:
        detail = (f"captured {human_bytes(snapshot.captured)}, verified {human_bytes(snapshot.verified)}, "
                  f"{human_rate(snapshot.rate)}")
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task("forwarded", total=snapshot.total, detail=detail)
        self.bar.update(self.task, completed=snapshot.forwarded, total=snapshot.total, detail=detail)

    def finish(self, result: dict[str, Any]) -> None:
        if self.task is not None:
            self.bar.stop()
        super().finish(result)


def make_reporter(as_json: bool) -> Reporter:
    if as_json:
        return JsonReporter()
    if sys.stderr.isatty():
        return RichReporter()
    return Reporter()
