"""The demo's console and its record: a spinner per long step, one line per decision.

Everything the console says about a decision is also kept, with the same words, so the
report and ``report.json`` show exactly what the user saw.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any


class Narrator:
    """Prints steps and decisions with rich, and records them with their times."""

    def __init__(self, console: Any = None):
        from rich.console import Console

        if console is None:
            console = Console(highlight=False)
            if not console.is_terminal:  # piped or captured: do not wrap at 80 columns
                console.width = max(console.width, 160)
        self.console = console
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.steps: list[dict[str, Any]] = []
        self.decisions: list[dict[str, Any]] = []

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    @contextlib.contextmanager
    def step(self, title: str, *, spinner: str | None = None) -> Iterator[dict[str, Any]]:
        """A named step: a rule, an optional spinner while it runs, its duration recorded.

        Steps whose own code draws a progress bar (sync, training) pass no ``spinner``.
        """
        self.console.rule(f"[bold]{title}")
        rec: dict[str, Any] = {"name": title, "start": self.now()}
        self.steps.append(rec)
        try:
            if spinner:
                with self.console.status(spinner):
                    yield rec
            else:
                yield rec
            rec["outcome"] = "ok"
        except BaseException as e:
            rec["outcome"] = f"failed: {type(e).__name__}"
            raise
        finally:
            rec["end"] = self.now()
            rec["seconds"] = round(rec["end"] - rec["start"], 1)

    def decision(self, what: str, outcome: str, where: list[str] | str, why: str,
                 **extra: Any) -> dict[str, Any]:
        """One clear line: what ran (or was refused) where, and why."""
        sites = [where] if isinstance(where, str) else list(where)
        color = {"refused": "red", "killed": "yellow"}.get(outcome, "cyan")
        shown = ", ".join(sites) if sites else "nowhere"
        self.console.print(f"[{color}]{outcome:>8}[/] [bold]{what}[/] → {shown}: {why}")
        rec = {"t": self.now(), "what": what, "outcome": outcome, "sites": sites, "why": why,
               **extra}
        self.decisions.append(rec)
        return rec

    def say(self, text: str) -> None:
        self.console.print(f"         {text}")
