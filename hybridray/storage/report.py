"""What a sync reports: live progress while it runs, and a result with a summary at the end."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class SyncResult:
    """The outcome of one ``sync_dataset`` call."""

    source: str
    destination: str
    outcome: str                  # committed | up-to-date
    version: int | None           # the destination's committed version afterwards
    previous_version: int | None
    sync_id: str
    dataset_id: str
    source_class: str
    data_class: str               # the class of what was written (after masking)
    files: int = 0                # source files in this version
    files_changed: int = 0        # new or changed source files (moved)
    files_unchanged: int = 0      # carried from the previous version (not moved)
    files_deleted: int = 0        # gone from the source, dropped from the version
    parts_written: int = 0
    parts_adopted: int = 0        # staged by an interrupted sync, verified and reused
    parts_carried: int = 0
    rows: int = 0                 # rows in the committed version
    rows_moved: int = 0
    bytes: int = 0                # bytes of the committed version
    bytes_moved: int = 0          # bytes that crossed from the source site to the destination:
    #                               the parts as written, after masking and compression
    bytes_read: int = 0           # source bytes those parts were made from (what the bar counts)
    seconds: float = 0.0
    cost: float = 0.0             # egress price of bytes_moved over the link
    masked: bool = False          # a rule changed or removed at least one column
    masking: dict[str, Any] | None = None   # what was done: rules per column, class lowered
    encrypted: bool = False
    garbage_collected: int = 0
    sites: dict[str, list[str]] = field(default_factory=dict)  # stage -> sites it ran at
    phases: dict[str, float] = field(default_factory=dict)     # phase -> seconds

    @property
    def mb_per_s(self) -> float:
        return self.bytes_moved / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["mb_per_s"] = round(self.mb_per_s, 3)
        return out

    def summary_rows(self) -> list[tuple[str, str]]:
        what = ("up to date, nothing moved" if self.outcome == "up-to-date"
                else f"committed version {self.version}")
        return [
            ("result", f"{self.source} → {self.destination}: {what}"),
            ("files", f"{self.files} ({self.files_changed} new or changed, "
                      f"{self.files_unchanged} unchanged and skipped, "
                      f"{self.files_deleted} deleted)"),
            ("parts", f"{self.parts_written} written, {self.parts_adopted} recovered from an "
                      f"interrupted sync, {self.parts_carried} kept"),
            ("rows", f"{self.rows:,} in the version, {self.rows_moved:,} moved"),
            ("bytes", f"{_size(self.bytes_moved)} moved (parts as written, after masking and "
                      f"compression; read from {_size(self.bytes_read)} at the source); the "
                      f"version holds {_size(self.bytes)}"),
            ("speed", f"{self.mb_per_s:.1f} MB/s over {self.seconds:.1f} s"),
            ("class", f"{self.source_class} → {self.data_class}"
                      + (" (masked)" if self.masked else "")
                      + (", encrypted at rest" if self.encrypted else "")),
            ("egress cost", f"${self.cost:.4f}"),
        ]


def print_summary(result: SyncResult, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    for key, value in result.summary_rows():
        table.add_row(f"[bold]{key}[/]", value)
    Console(file=file or sys.stdout).print(table)


class RichProgress:
    """A live bar of parts and bytes on stderr (plain lines when it is not a terminal)."""

    def __init__(self, file=None):
        from rich.console import Console

        self.console = Console(file=file or sys.stderr)
        self._progress = None
        self._task = None

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        if event == "stage" and not self.console.is_terminal:
            self.console.print(info["message"], soft_wrap=True)
        elif event == "start":
            if not self.console.is_terminal:
                self.console.print(f"moving {info['parts']} parts: reading "
                                   f"{_size(info['bytes'])} at the source", soft_wrap=True)
                return
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                      DownloadColumn(), TransferSpeedColumn(),
                                      TimeRemainingColumn(), console=self.console)
            self._progress.start()
            self._task = self._progress.add_task(f"{info['parts']} parts (source bytes)",
                                                 total=info["bytes"])
        elif event == "part":
            if self._progress is not None:   # the bar counts source bytes, as its total does
                self._progress.advance(self._task, info.get("source_bytes", info["bytes"]))
            else:
                self.console.print(f"  wrote {info['path']} ({_size(info['bytes'])} from "
                                   f"{_size(info.get('source_bytes', info['bytes']))} of "
                                   f"source, {info['rows']:,} rows) at "
                                   f"{info.get('site', '?')}", soft_wrap=True)
        elif event == "stage" and self._progress is not None:
            self._progress.console.print(info["message"], soft_wrap=True)
        elif event == "end" and self._progress is not None:
            self._progress.stop()
            self._progress = None


Progress = Callable[[str, dict[str, Any]], None]


def no_progress(event: str, info: dict[str, Any]) -> None:
    return None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
