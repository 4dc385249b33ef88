"""Ray Serve application builders: what ``import_path`` in a Serve config points at.

``deploy`` runs one application per (model, version, site) plus one for the ingress, so a
version can come or go without touching the others (``replica_app``, ``ingress_app``).
``service_app`` builds the whole service as *one* application for ``serve run`` and
``serve deploy`` of a single application (see ``jobs/serve.py``): the same deployments and
options, bound into the ingress.
"""

from __future__ import annotations

import os
from typing import Any

from ray.serve import Application


def replica_app(args: dict[str, Any]) -> Application:
    """One replica deployment (multi-application mode)."""
    from hybridray.serve.replicas import CompletionReplica, EmbeddingReplica

    cls = EmbeddingReplica if args["kind"] == "embedding" else CompletionReplica
    return cls.options(name=args["deployment"]).bind(args["spec"])


def ingress_app(args: dict[str, Any]) -> Application:
    """The ingress (multi-application mode); its routing table is its ``user_config``."""
    from hybridray.serve.ingress import Ingress

    return Ingress.bind(args["service"])


def service_app(args: dict[str, Any]) -> Application:
    """The whole service as one application.

    ``args``: ``config`` (a serve file path), optional ``overrides`` (a list, or a string
    of space-separated ``key=value``), optional ``cluster`` (a recorded cluster name, for
    its topology) or ``topology`` (a cluster file). Token digests come from the serve file's
    ``auth`` settings, read where the application is built.
    """
    from hybridray.serve.config import load_serve_config
    from hybridray.serve.ingress import Ingress
    from hybridray.serve.plan import INGRESS, plan_service
    from hybridray.serve.replicas import CompletionReplica, EmbeddingReplica
    from hybridray.serve.service import read_token_digests

    overrides = args.get("overrides") or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    config = load_serve_config(args["config"], overrides)
    topology = _topology(args, config)
    plan = plan_service(config, topology)
    handles = {}
    for r in plan.replicas:
        cls = EmbeddingReplica if r.kind == "embedding" else CompletionReplica
        handles[r.deployment] = cls.options(name=r.deployment, **r.options).bind(r.spec)
    routing = plan.routing(read_token_digests(config), single_app=True)
    return Ingress.options(name=INGRESS, **plan.ingress_options, user_config=routing).bind(
        config.name, handles=handles)


def _topology(args: dict[str, Any], config):
    from hybridray.cluster import load_state
    from hybridray.topology import load_topology

    if args.get("topology"):
        return load_topology(args["topology"])
    name = args.get("cluster") or config.cluster or os.environ.get("HYBRIDRAY_CLUSTER")
    if not name:
        from hybridray.cluster import list_clusters

        known = list_clusters()
        if len(known) != 1:
            from hybridray.exceptions import ClusterNotFound

            raise ClusterNotFound("say which cluster's topology to place by: cluster=NAME or "
                                  f"topology=FILE (recorded: {', '.join(known) or 'none'})")
        name = known[0]
    return load_state(name).topology()
