"""Prometheus metrics of a service, per site, route, model and version (``ray.util.metrics``).

Ray exports them from every node's metrics agent (the port Prometheus already scrapes for
Ray's own metrics), prefixed ``ray_``. Serve's built-in metrics (``ray_serve_*``) cover the
proxy and each deployment; these add what only hybridray knows: which *site* answered, which
version, how requests failed over between sites, and the batch sizes ``@serve.batch`` formed.

    sum by (site) (rate(ray_hybridray_serve_requests_total[1m]))          # throughput per site
    histogram_quantile(0.99, sum by (le, route, site)
        (rate(ray_hybridray_serve_request_latency_ms_bucket[5m])))          # p99 per route/site
    sum by (model, site) (ray_hybridray_serve_replicas)                    # replicas per site
"""

from __future__ import annotations

import functools

LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 30_000, 60_000]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


class Metrics:
    """The metric objects of one process (a replica or an ingress)."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.requests = Counter(
            "hybridray_serve_requests", "Requests answered, by route, model, version, site "
            "and HTTP status.",
            tag_keys=("service", "route", "model", "version", "site", "status"))
        self.latency = Histogram(
            "hybridray_serve_request_latency_ms", "End-to-end latency at the ingress.",
            boundaries=LATENCY_MS, tag_keys=("service", "route", "model", "site"))
        self.tokens = Counter(
            "hybridray_serve_tokens", "Tokens read (prompt) and written (completion).",
            tag_keys=("service", "model", "version", "site", "kind"))
        self.batch_size = Histogram(
            "hybridray_serve_batch_size", "Inputs per @serve.batch call of a replica.",
            boundaries=BATCH_SIZES, tag_keys=("service", "model", "version", "site"))
        self.replicas = Gauge(
            "hybridray_serve_replicas", "Running replicas per model, version and site, as "
            "the ingress sees them.", tag_keys=("service", "model", "version", "site"))
        self.failovers = Counter(
            "hybridray_serve_failovers", "Requests that left a site for another one.",
            tag_keys=("service", "model", "from_site", "to_site", "reason"))
        self.rejected = Counter(
            "hybridray_serve_rejected", "Requests refused before reaching a model.",
            tag_keys=("service", "route", "reason"))


@functools.lru_cache(maxsize=1)
def metrics() -> Metrics:
    """This process's metrics (created on first use, inside a Ray worker)."""
    return Metrics()
