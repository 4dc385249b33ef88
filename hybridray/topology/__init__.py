"""Topology as code: the validated model of a hybrid cluster and its loader."""

from hybridray.topology.loader import load_topology, parse_topology
from hybridray.topology.models import (
    DataClass,
    Head,
    Link,
    NodePool,
    Provider,
    Site,
    SiteKind,
    Storage,
    Topology,
)

__all__ = [
    "DataClass", "Head", "Link", "NodePool", "Provider", "Site", "SiteKind", "Storage",
    "Topology", "load_topology", "parse_topology",
]
