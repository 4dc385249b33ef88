"""The node labels and custom resources that make a Ray node site-aware.

Every node hybridray starts or renders carries the same labels, so placement can select by
them with Ray's own ``label_selector``. One function builds them for the local launcher, the
on-prem join scripts, the ``ray up`` file and the KubeRay manifest alike.
"""

from __future__ import annotations

from hybridray.topology.models import NodePool, Site, Topology
from hybridray.topology.syntax import label_key_problem, label_value_problem

SITE = "hybridray.io/site"
SITE_KIND = "hybridray.io/site-kind"
MAX_DATA_CLASS = "hybridray.io/max-data-class"
POOL = "hybridray.io/pool"
PROVIDER = "hybridray.io/provider"
CLUSTER = "hybridray.io/cluster"
ROLE = "hybridray.io/role"
# Ray's own well-known keys. Mapping a site onto an availability zone lets Ray features that
# prefer "the same zone" (Serve's locality routing, for one) prefer the same site.
ZONE = "ray.io/availability-zone"
REGION = "ray.io/region"
MARKET_TYPE = "ray.io/market-type"
ACCELERATOR = "ray.io/accelerator-type"


def site_resource(site: str) -> str:
    """Custom resource every node of ``site`` carries (1000 units per node)."""
    return f"site:{site}"


SITE_RESOURCE_UNITS = 1000.0


def node_labels(topology: Topology, site_name: str, pool: NodePool | None,
                role: str = "worker") -> dict[str, str]:
    """Labels for one node of ``pool`` at ``site_name`` (``pool`` is None for the head)."""
    site: Site = topology.sites[site_name]
    labels = {
        CLUSTER: topology.name,
        SITE: site_name,
        SITE_KIND: site.kind.value,
        MAX_DATA_CLASS: site.max_data_class.value,
        PROVIDER: site.provider.value,
        ROLE: role,
        ZONE: site_name,
    }
    if site.region:
        labels[REGION] = site.region
    if pool is not None:
        labels[POOL] = pool.name
        labels[MARKET_TYPE] = "spot" if pool.spot else "on-demand"
        if pool.accelerator:
            labels[ACCELERATOR] = pool.accelerator
    return labels


def node_resources(site_name: str, pool: NodePool | None) -> dict[str, float]:
    """Custom resources for one node: the site token plus the pool's own extras."""
    resources = {site_resource(site_name): SITE_RESOURCE_UNITS}
    if pool is not None:
        resources.update(pool.resources)
    return resources


def labels_arg(labels: dict[str, str]) -> str:
    """``ray start --labels`` syntax: ``k=v,k=v``.

    Safe by construction: every key and value is checked against Ray's label syntax first,
    so no value can carry a ``,`` or ``=`` (another label), a quote, a space or a newline.

    Raises:
        ConfigError: a key or value that is not label syntax (topology validation refuses
            such values first; this catches models built without it).
    """
    from hybridray.exceptions import ConfigError

    for key, value in labels.items():
        why = label_key_problem(key) or label_value_problem(str(value))
        if why:
            raise ConfigError(f"node label {key}={value!r}: {why}; fix the cluster file value "
                              "it came from (hybridray validate names it)")
    return ",".join(f"{k}={v}" for k, v in labels.items())
