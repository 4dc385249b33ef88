"""Defence in depth: a check that runs *inside* a worker before it touches classified data.

Placement already keeps work off nodes that may not hold its data, but labels can be wrong,
a selector can be edited by hand, and user code can be called from anywhere. The guard reads
the labels of the node the code is actually running on and refuses if that node's
``hybridray.io/max-data-class`` is below the data's class (or missing: deny by default).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from hybridray import labels as L
from hybridray.exceptions import ResidencyViolation
from hybridray.topology.models import DataClass

F = TypeVar("F", bound=Callable[..., Any])


def current_node_labels() -> dict[str, str]:
    """Labels of the Ray node this code runs on ({} outside Ray)."""
    import ray

    if not ray.is_initialized():
        return {}
    return dict(ray.get_runtime_context().get_node_labels() or {})


def check_residency(data_class: DataClass | str,
                    node_labels: dict[str, str] | None = None) -> str:
    """Raise ``ResidencyViolation`` unless this node may hold ``data_class``; return its site."""
    cls = DataClass(data_class)
    labels = current_node_labels() if node_labels is None else node_labels
    site = labels.get(L.SITE, "<unlabelled node>")
    limit = labels.get(L.MAX_DATA_CLASS)
    if limit is None:
        raise ResidencyViolation(
            f"node at {site} carries no {L.MAX_DATA_CLASS} label, so it may not touch "
            f"{cls.value} data (deny by default)",
            fix="start nodes with `hybridray up` or the rendered join scripts, which label them")
    if DataClass(limit) < cls:
        raise ResidencyViolation(
            f"node at site {site} may hold up to {limit}, but this code touches {cls.value} data",
            fix=f"place the work with hybridray (data_classes=[{cls.value!r}]) so it runs only "
                "where that class is allowed")
    return site


def guarded(data_class: DataClass | str) -> Callable[[F], F]:
    """Decorator: run ``check_residency(data_class)`` before every call of the function."""
    cls = DataClass(data_class)

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            check_residency(cls)
            return fn(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap
