"""Typed, validated models of a hybrid topology: sites, node pools, storage, links, data rules.

A cluster file is validated once, at the edge (``hybridray.topology.load``); everything inside
the library sees these frozen models only. Cross-field checks raise ``ValueError`` whose text
starts with ``@sub.path@`` so the loader can report the exact YAML key that is wrong.
"""

from __future__ import annotations

import enum
import os
import re
from functools import cached_property
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hybridray.topology.syntax import (
    dns_label_problem,
    host_problem,
    label_key_problem,
    label_value_problem,
)

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$"
# In a storage root, the cluster's own name: two clusters from one file never share storage.
CLUSTER_VAR = "HYBRIDRAY_CLUSTER"
CLUSTER_VAR_RE = re.compile(r"\$\{HYBRIDRAY_CLUSTER\}|\$HYBRIDRAY_CLUSTER(?![A-Za-z0-9_])")
NAME_HELP = "lowercase letters, digits and '-', 1-32 characters, starting and ending alphanumeric"
#: How long a node of an elastic pool may sit idle before Ray's autoscaler stops it, unless
#: the pool sets ``idle_timeout_s`` (Ray's own default is 5 minutes too).
DEFAULT_IDLE_TIMEOUT_S = 300.0
_NAME_RE = re.compile(NAME_PATTERN)
_RESOURCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,62}")


def problem(subpath: str, message: str) -> ValueError:
    """A cross-field error that the loader reports at ``<model path>.<subpath>``."""
    return ValueError(f"@{subpath}@ {message}")


class DataClass(str, enum.Enum):
    """Sensitivity of data, ordered ``public < internal < confidential < restricted``."""

    public = "public"
    internal = "internal"
    confidential = "confidential"
    restricted = "restricted"

    @property
    def rank(self) -> int:
        return _CLASS_ORDER.index(self)

    # str defines its own (alphabetical) comparisons, so all four must be overridden, and a
    # plain string on either side is converted: returning NotImplemented would hand the
    # comparison to str and give the alphabetical answer ("confidential" <= public).
    def __lt__(self, other: object) -> bool:
        return self.rank < _as_class(other).rank

    def __le__(self, other: object) -> bool:
        return self.rank <= _as_class(other).rank

    def __gt__(self, other: object) -> bool:
        return self.rank > _as_class(other).rank

    def __ge__(self, other: object) -> bool:
        return self.rank >= _as_class(other).rank

    def __hash__(self) -> int:
        return hash(self.value)

    def at_least(self) -> list[DataClass]:
        """This class and every class above it."""
        return _CLASS_ORDER[self.rank :]

    def __str__(self) -> str:
        return self.value


_CLASS_ORDER = [DataClass.public, DataClass.internal, DataClass.confidential, DataClass.restricted]


def _as_class(value: object) -> DataClass:
    if isinstance(value, DataClass):
        return value
    if isinstance(value, str):
        try:
            return DataClass(value)
        except ValueError:
            pass
    raise TypeError(f"cannot compare a data class with {value!r}; use one of "
                    f"{', '.join(c.value for c in _CLASS_ORDER)}")


class SiteKind(str, enum.Enum):
    onprem = "onprem"
    private = "private"
    cloud = "cloud"


class Provider(str, enum.Enum):
    local = "local"            # a process on this machine (simulation and development)
    static = "static"          # on-prem hosts you list; joined with a script
    aws = "aws"
    gcp = "gcp"
    azure = "azure"
    kubernetes = "kubernetes"  # KubeRay


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Name = Annotated[str, Field(pattern=NAME_PATTERN, description=NAME_HELP)]


class NodePool(_Strict):
    """A group of identical nodes at one site."""

    name: Name = Field(description="Pool name, unique within its site.")
    cpus: float = Field(gt=0, le=4096, description="CPUs per node (logical CPUs for Ray).")
    gpus: int = Field(0, ge=0, le=64, description="GPUs per node.")
    accelerator: str | None = Field(
        None, description="Accelerator type, e.g. H100 or A10G; becomes a Ray label."
    )
    memory_gb: float = Field(gt=0, le=65536, description="Memory per node in GiB.")
    count: int | None = Field(None, ge=0, le=10000, description="Fixed number of nodes.")
    min: int | None = Field(None, ge=0, le=10000, description="Autoscaling minimum nodes.")
    max: int | None = Field(None, ge=1, le=10000, description="Autoscaling maximum nodes.")
    idle_timeout_s: float | None = Field(
        None, gt=0, le=604_800,
        description="Elastic pools (min/max) only: seconds a node may sit idle before Ray's "
                    f"autoscaler stops it (default {DEFAULT_IDLE_TIMEOUT_S:g}); min nodes "
                    "are kept.")
    spot: bool = Field(False, description="Spot / preemptible capacity.")
    price_per_node_hour: float = Field(
        ge=0, le=10000, description="What one node costs per hour (amortised for on-prem)."
    )
    object_store_mb: int = Field(
        100, ge=80, le=1_048_576, description="Ray object store per node (local clusters)."
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="Extra Ray custom resources per node."
    )
    instance_type: str | None = Field(None, description="Cloud instance type (aws, gcp, azure).")
    hosts: list[str] = Field(
        default_factory=list, description="Host names or addresses (static provider)."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Kubernetes nodeSelector (kubernetes provider)."
    )

    # Values that become Ray labels, ray start arguments, file names or shell words: Ray's
    # label syntax or a host-name/IP syntax, refused here with the key path (topology/syntax.py).
    @field_validator("accelerator", "instance_type")
    @classmethod
    def _label_safe(cls, value: str | None) -> str | None:
        why = None if value is None else label_value_problem(value)
        if why:
            raise ValueError(why)
        return value

    @field_validator("hosts")
    @classmethod
    def _hosts_syntax(cls, value: list[str]) -> list[str]:
        for i, host in enumerate(value):
            why = host_problem(host)
            if why:
                raise problem(f"[{i}]", why)
        return value

    @field_validator("node_selector")
    @classmethod
    def _selector_syntax(cls, value: dict[str, str]) -> dict[str, str]:
        for key, label in value.items():
            why = label_key_problem(key) or label_value_problem(label)
            if why:
                raise problem(key, why)
        return value

    @field_validator("resources")
    @classmethod
    def _resources_positive(cls, value: dict[str, float]) -> dict[str, float]:
        for key, amount in value.items():
            if not _RESOURCE_RE.fullmatch(key):
                raise problem(key, f"a custom resource name is at most 63 letters, digits, "
                                   f"'-', '_', '.', ':' or '/' (got {key!r})")
            if key in ("CPU", "GPU", "memory", "object_store_memory"):
                raise problem(key, f"'{key}' is set by cpus/gpus/memory_gb; remove it here")
            if amount < 0:
                raise problem(key, f"must be >= 0 (got {amount})")
        return value

    @model_validator(mode="after")
    def _sizes(self) -> NodePool:
        if self.count is not None and (self.min is not None or self.max is not None):
            raise problem("count", "set either count or min/max, not both")
        if self.count is None and self.min is None and self.max is None:
            raise problem("count", "missing: set count (fixed size) or min and max (autoscaling)")
        if self.count is None and (self.min is None or self.max is None):
            missing = "max" if self.max is None else "min"
            raise problem(missing, "missing: autoscaling pools need both min and max")
        if self.min is not None and self.max is not None and self.max < self.min:
            raise problem("max", f"must be >= min (got {self.max} < {self.min})")
        if self.accelerator and self.gpus == 0:
            raise problem("accelerator", "set gpus >= 1 for a pool with an accelerator")
        if self.idle_timeout_s is not None and self.count is not None:
            raise problem("idle_timeout_s", "only elastic pools (min/max) stop idle nodes; "
                          "remove idle_timeout_s, or replace count with min and max")
        if self.idle_timeout_s is not None and self.min is not None and self.min == self.max:
            raise problem("idle_timeout_s", f"min = max = {self.min}: Ray's autoscaler keeps "
                          "min nodes, so none ever stops when idle; lower min (e.g. min: 0) "
                          "or remove idle_timeout_s")
        return self

    @property
    def elastic(self) -> bool:
        """Sized by Ray's autoscaler between ``min`` and ``max`` (not a fixed ``count``)."""
        return self.count is None

    @property
    def idle_timeout(self) -> float:
        """Seconds an idle node of this elastic pool lives (``DEFAULT_IDLE_TIMEOUT_S``)."""
        return DEFAULT_IDLE_TIMEOUT_S if self.idle_timeout_s is None else self.idle_timeout_s

    @property
    def min_nodes(self) -> int:
        return self.count if self.count is not None else int(self.min or 0)

    @property
    def max_nodes(self) -> int:
        return self.count if self.count is not None else int(self.max or 0)


class Storage(_Strict):
    """Where a site keeps datasets, checkpoints and models (a pyarrow filesystem URI)."""

    root: str = Field(description="file:///path, s3://bucket/prefix or gs://bucket/prefix; "
                                  "${HYBRIDRAY_CLUSTER} in it is the cluster's name.")
    endpoint: str | None = Field(None, description="S3-compatible endpoint URL (s3:// only).")
    region: str | None = Field(None, description="Object store region (s3:// and gs://).")
    encrypt_at_rest: bool = Field(
        False, description="Write Parquet with modular encryption (keys held by the cluster)."
    )

    @field_validator("root")
    @classmethod
    def _root_scheme(cls, value: str) -> str:
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme not in ("file", "s3", "gs"):
            raise ValueError(
                f"must be a URI starting with file://, s3:// or gs:// (got {value!r})"
            )
        rest = value.split("://", 1)[1]
        if not rest.strip("/"):
            raise ValueError(f"has no path or bucket after the scheme (got {value!r})")
        if CLUSTER_VAR_RE.search(value):
            raise ValueError(f"uses ${{{CLUSTER_VAR}}} outside a cluster file: only a "
                             f"topology's own storage roots name their cluster (got {value!r})")
        if scheme == "file":  # expand ~ and $VARS once, here, so every reader agrees
            home = os.environ.get("HYBRIDRAY_HOME") or "~/.hybridray"  # always defined
            rest = rest.replace("${HYBRIDRAY_HOME}", home).replace("$HYBRIDRAY_HOME", home)
            path = os.path.abspath(os.path.expanduser(os.path.expandvars(rest)))
            if "$" in path:
                raise ValueError(f"uses an environment variable that is not set (got {value!r})")
            return "file://" + path
        return value

    @model_validator(mode="after")
    def _endpoint_only_for_s3(self) -> Storage:
        if self.endpoint is not None:
            if not self.root.startswith("s3://"):
                raise problem("endpoint", "only applies to s3:// roots; remove it")
            if not re.match(r"^https?://[^/\s]+", self.endpoint):
                raise problem("endpoint", f"must be http(s)://host[:port] (got {self.endpoint!r})")
        return self

    @property
    def scheme(self) -> str:
        return self.root.split("://", 1)[0]

    @property
    def path(self) -> str:
        """The root without its scheme: a local path for file://, bucket/prefix otherwise."""
        return self.root.split("://", 1)[1]


class Link(_Strict):
    """The network path from one site to another, and what sending data over it costs."""

    bandwidth_mbps: float = Field(gt=0, le=10_000_000, description="Usable bandwidth, Mbit/s.")
    latency_ms: float = Field(ge=0, le=100_000, description="One-way latency in ms.")
    egress_per_gb: float = Field(0.0, ge=0, le=1000, description="Price per GB sent over it.")


class Site(_Strict):
    """A place where nodes live: an on-prem room, a private cloud, a cloud region."""

    kind: SiteKind = Field(description="onprem, private or cloud.")
    provider: Provider = Field(description="local, static, aws, gcp, azure or kubernetes.")
    region: str | None = Field(None, description="Provider region, e.g. us-east-1.")
    zone: str | None = Field(None, description="Availability zone, e.g. us-east-1a.")
    max_data_class: DataClass = Field(
        DataClass.public,
        description="Highest data class this site may hold; deny by default (public).",
    )
    storage: Storage = Field(description="Where this site stores data.")
    pools: list[NodePool] = Field(min_length=1, description="Node pools at this site.")
    links: dict[str, Link] = Field(
        default_factory=dict, description="Links from this site to others, by site name."
    )
    namespace: str | None = Field(None, description="Kubernetes namespace (kubernetes provider).")

    @field_validator("region", "zone")
    @classmethod
    def _label_safe(cls, value: str | None) -> str | None:
        why = None if value is None else label_value_problem(value)
        if why:
            raise ValueError(why)
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace_syntax(cls, value: str | None) -> str | None:
        why = None if value is None else dns_label_problem(value)
        if why:
            raise ValueError(why)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Site:
        seen: set[str] = set()
        for i, pool in enumerate(self.pools):
            if pool.name in seen:
                raise problem(f"pools[{i}].name", f"duplicate pool name {pool.name!r}")
            seen.add(pool.name)
        if self.provider in (Provider.aws, Provider.gcp, Provider.azure) and not self.region:
            raise problem("region", f"required for provider {self.provider.value}")
        for i, pool in enumerate(self.pools):
            if self.provider is Provider.static and not pool.hosts:
                raise problem(f"pools[{i}].hosts", "static pools must list their hosts")
            if self.provider is Provider.static and len(pool.hosts) < pool.max_nodes:
                raise problem(
                    f"pools[{i}].hosts",
                    f"lists {len(pool.hosts)} hosts but the pool has {pool.max_nodes} nodes",
                )
            if pool.hosts and self.provider is not Provider.static:
                raise problem(f"pools[{i}].hosts", "only static pools take hosts; remove it")
            if pool.node_selector and self.provider is not Provider.kubernetes:
                raise problem(f"pools[{i}].node_selector", "only kubernetes pools take it")
            if pool.instance_type and self.provider not in (
                Provider.aws, Provider.gcp, Provider.azure
            ):
                raise problem(f"pools[{i}].instance_type", "only cloud providers take it")
        if self.namespace and self.provider is not Provider.kubernetes:
            raise problem("namespace", "only kubernetes sites take a namespace")
        for i, pool in enumerate(self.pools):
            if self.kind is SiteKind.onprem and pool.spot:
                raise problem(f"pools[{i}].spot", "on-prem pools cannot be spot; set spot: false")
        return self

    def cheapest_pool(self, cpus: float = 0, gpus: int = 0,
                      accelerator: str | None = None) -> NodePool | None:
        """The cheapest pool whose single node fits one unit of the given shape."""
        fits = [p for p in self.pools if p.max_nodes > 0 and p.cpus >= cpus and p.gpus >= gpus
                and (accelerator is None or p.accelerator == accelerator)]
        return min(fits, key=lambda p: p.price_per_node_hour, default=None)

    @property
    def max_cpus(self) -> float:
        return sum(p.cpus * p.max_nodes for p in self.pools)

    @property
    def max_gpus(self) -> int:
        return sum(p.gpus * p.max_nodes for p in self.pools)

    def may_hold(self, data_class: DataClass) -> bool:
        return data_class <= self.max_data_class


class Head(_Strict):
    """Where the Ray head runs. It gets no logical CPUs by default, so work lands on sites."""

    site: str = Field(description="Site that hosts the head node.")
    cpus: float = Field(0, ge=0, le=4096,
                        description="Logical CPUs on the head (0 keeps work off).")
    object_store_mb: int = Field(100, ge=80, le=1_048_576, description="Head object store size.")
    autoscaler_interval_s: int = Field(
        5, ge=1, le=300,
        description="Seconds between rounds of Ray's autoscaler, which runs on the head when "
                    "a local site has an elastic pool (min/max).")


class Topology(_Strict):
    """One hybrid Ray cluster: a head and the sites its nodes live in."""

    name: Name = Field(description="Cluster name; state lives under ~/.hybridray/clusters/NAME.")
    description: str = Field("", description="Free text.")
    head: Head = Field(description="Where the Ray head runs.")
    sites: dict[str, Site] = Field(min_length=1, description="Sites, by name.")
    default_data_class: DataClass = Field(
        DataClass.restricted,
        description="Class of work and data that declare none (a Workload without "
                    "data_classes, a sync source without a manifest or --data-class, a "
                    "training corpus without data.data_class). Deny by default: restricted.")

    @model_validator(mode="before")
    @classmethod
    def _cluster_in_roots(cls, data):
        """``${HYBRIDRAY_CLUSTER}`` in a storage root is this topology's ``name``.

        Substituted here, before the roots are validated, from the topology itself and never
        from the environment (a shell that ran ``hybridray env local`` exports
        HYBRIDRAY_CLUSTER=local, and the demo's cluster must still write under its own name).
        So ``name=demo`` on ``clusters/local.yaml`` gives the demo roots of its own.
        """
        if not isinstance(data, dict) or not isinstance(data.get("sites"), dict):
            return data
        name = data.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            return data   # the name's own error is reported; the roots keep the variable
        sites = {}
        for key, site in data["sites"].items():
            storage = site.get("storage") if isinstance(site, dict) else None
            root = storage.get("root") if isinstance(storage, dict) else None
            if isinstance(root, str) and CLUSTER_VAR_RE.search(root):
                site = {**site, "storage": {**storage,
                                            "root": CLUSTER_VAR_RE.sub(name, root)}}
            sites[key] = site
        return {**data, "sites": sites}

    @model_validator(mode="after")
    def _references(self) -> Topology:
        for name in self.sites:
            if not _NAME_RE.match(name):
                raise problem(f"sites.{name}", f"site name must be {NAME_HELP}")
        if self.head.site not in self.sites:
            raise problem("head.site", f"unknown site {self.head.site!r} (sites: "
                          f"{', '.join(self.sites)})")
        for name, site in self.sites.items():
            for target in site.links:
                if target == name:
                    raise problem(f"sites.{name}.links.{target}", "a site cannot link to itself")
                if target not in self.sites:
                    raise problem(f"sites.{name}.links.{target}",
                                  f"links to unknown site {target!r} (sites: "
                                  f"{', '.join(self.sites)})")
        return self

    def site(self, name: str) -> Site:
        """The named site, or a ConfigError-style KeyError naming the choices."""
        try:
            return self.sites[name]
        except KeyError:
            raise KeyError(f"unknown site {name!r}; this cluster has: "
                           f"{', '.join(self.sites)}") from None

    def link(self, src: str, dst: str) -> Link | None:
        """The link src → dst, falling back to dst → src (links are often declared once)."""
        if src == dst:
            return None
        return self.sites[src].links.get(dst) or self.sites[dst].links.get(src)

    @cached_property
    def sites_by_class(self) -> dict[DataClass, list[str]]:
        """For each data class, the names of sites that may hold it."""
        return {c: [n for n, s in self.sites.items() if s.may_hold(c)] for c in DataClass}

    def egress_cost(self, src: str, dst: str, nbytes: int) -> float:
        """Price of sending ``nbytes`` from ``src`` to ``dst`` (0 without a priced link).

        Uses the same link as ``link``: one declared in a single direction prices both.
        """
        link = self.link(src, dst)
        return 0.0 if link is None else link.egress_per_gb * nbytes / 1e9

