"""Paths tests share, resolved from this file so tests work from any working directory."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = ROOT / "clusters"
