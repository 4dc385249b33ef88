"""Shared pieces of the security tests: Ray's label-selector semantics, and audit look-ups."""

from __future__ import annotations

from typing import Any


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether a node with ``labels`` satisfies a Ray ``label_selector`` (``v``, ``!v``,
    ``in(a,b)``, ``!in(a,b)``), as Ray's scheduler evaluates it."""
    for key, want in selector.items():
        have = labels.get(key)
        negate = want.startswith("!")
        body = want[1:] if negate else want
        values = body[3:-1].split(",") if body.startswith("in(") else [body]
        hit = have is not None and have in values
        if hit == negate:
            return False
    return True


def every_selector(opts: dict[str, Any]) -> list[dict[str, str]]:
    """The primary selector and every fallback's, of task/actor/Data options."""
    return [opts["label_selector"]] + [f["label_selector"]
                                       for f in opts.get("fallback_strategy") or ()]


def refusals(audit, **match) -> list[dict]:
    return audit.read("refusal", **match)
