"""Load cluster files: safe YAML in, a validated ``Topology`` (or every problem at once) out.

The reading rules (duplicate keys, alias bombs, multi-document files, overrides, one line per
problem) are those of every hybridray config file: see ``hybridray.configfile``.
"""

from __future__ import annotations

import os
from typing import Any

from hybridray.configfile import (  # noqa: F401  (re-exported: the loader's public names)
    MAX_EXPANDED_NODES,
    MAX_FILE_BYTES,
    apply_override,
    read_config_text,
    safe_yaml,
    validate_config,
)
from hybridray.configfile import format_validation_error as _format
from hybridray.topology.models import NAME_HELP, NAME_PATTERN, Topology


def load_topology(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Topology:
    """Read, override and validate a cluster file.

    Args:
        path: a ``clusters/*.yaml`` file.
        overrides: ``key.sub=value`` strings, e.g. ``sites.onprem.pools.0.count=2``.

    Raises:
        ConfigError: listing every problem as ``file: key.path: message``.
    """
    text = read_config_text(path, kind="cluster file", example="clusters/local.yaml")
    return parse_topology(text, label=str(path), overrides=overrides)


def parse_topology(text: str, *, label: str = "<string>",
                   overrides: list[str] | tuple[str, ...] = ()) -> Topology:
    """Like ``load_topology`` but from YAML text (``label`` names it in errors)."""
    return validate_config(Topology, safe_yaml(text, label), label=label, overrides=overrides,
                           name_pattern=NAME_PATTERN, name_help=NAME_HELP)


def format_validation_error(error: Any, label: str) -> list[str]:
    """A topology's validation error, one ``file: key.path: message`` line per problem."""
    return _format(error, label, Topology, name_pattern=NAME_PATTERN, name_help=NAME_HELP)
