"""Where hybridray keeps its state: cluster records, audit logs, secrets, reports."""

from __future__ import annotations

import os
from pathlib import Path


def hybridray_home(home: str | os.PathLike | None = None) -> Path:
    """``home`` or ``$HYBRIDRAY_HOME`` or ``~/.hybridray``."""
    return Path(home or os.environ.get("HYBRIDRAY_HOME") or Path.home() / ".hybridray")
