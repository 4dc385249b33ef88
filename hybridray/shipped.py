"""Where the cluster files and configs that come with hybridray live.

A checkout has them at the top (``clusters/local.yaml``, ``configs/train/tiny.yaml``); an
installed package carries the same files under ``hybridray/_shipped/`` (``setup.py`` copies
them in at build time, so there is one copy in the repository). ``shipped("clusters/local.yaml")``
finds either, so the demo and the documented ``configs/...`` paths work from a checkout and
from ``pip install hybridray`` alike.
"""

from __future__ import annotations

from pathlib import Path

from hybridray.exceptions import ConfigError

PACKAGED = Path(__file__).resolve().parent / "_shipped"
CHECKOUT = Path(__file__).resolve().parent.parent
FOLDERS = ("clusters", "configs")


def shipped_path(relative: str | Path) -> Path | None:
    """The shipped file at ``relative`` (e.g. ``clusters/local.yaml``), or None."""
    rel = Path(relative)
    if rel.is_absolute() or not rel.parts or rel.parts[0] not in FOLDERS or ".." in rel.parts:
        return None
    for base in (PACKAGED, CHECKOUT):
        if (base / rel).is_file():
            return base / rel
    return None


def shipped(relative: str) -> Path:
    """Like ``shipped_path``, but a missing file is a ``ConfigError`` (a broken install)."""
    found = shipped_path(relative)
    if found is None:
        raise ConfigError(f"{relative}: not found beside hybridray ({PACKAGED}) nor in a "
                          "checkout; reinstall hybridray (pip install hybridray)")
    return found
