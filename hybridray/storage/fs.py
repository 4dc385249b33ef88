"""Turn a site's ``storage`` block into a pyarrow filesystem and a base path.

Everything hybridray reads or writes at a site (datasets, checkpoints, models) goes through
this one function, so ``file://`` on-prem roots, ``s3://`` roots with a custom endpoint (MinIO,
a loopback test server) and ``gs://`` roots behave the same way to the rest of the code.
S3 credentials come from the usual AWS chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
profiles, instance roles); they never live in cluster files.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import urlparse

from hybridray.exceptions import ConfigError
from hybridray.topology.models import Site, Topology

_ADDRESS = re.compile(r"^(?P<site>[a-z0-9][a-z0-9-]*):(?P<path>[^:]*)$")


def site_filesystem(site: Site, *, connect_timeout: float = 5.0, retries: int = 3):
    """(pyarrow filesystem, base path) for ``site.storage.root``.

    Retries are bounded so an S3 endpoint that is down fails in seconds with a clear error
    rather than hanging.
    """
    import pyarrow.fs as pafs

    storage = site.storage
    if storage.scheme == "file":
        return pafs.LocalFileSystem(), storage.path.rstrip("/")
    if storage.scheme == "s3":
        return s3_filesystem(storage.endpoint, region=storage.region,
                             connect_timeout=connect_timeout, retries=retries), \
            storage.path.strip("/")
    if storage.scheme == "gs":
        return pafs.GcsFileSystem(retry_time_limit_seconds=connect_timeout * retries), \
            storage.path.strip("/")
    raise ConfigError(f"storage root {storage.root!r}: unsupported scheme")  # models refuse it


def s3_filesystem(endpoint: str | None = None, *, region: str | None = None,
                  connect_timeout: float = 5.0, retries: int = 3,
                  allow_bucket_creation: bool | None = None, emulator: bool = False):
    """A ``pyarrow.fs.S3FileSystem`` for AWS (``endpoint`` None) or an S3-compatible server.

    A loopback endpoint (the local cluster's emulator) gets placeholder keys when the
    environment has none, since any key works there and the AWS default chain would
    otherwise probe EC2 instance metadata for seconds before giving up. ``emulator`` says
    the endpoint is hybridray's own S3 server elsewhere (a namespace host), with the same keys.
    """
    import pyarrow.fs as pafs

    kwargs = {"region": region or "us-east-1", "connect_timeout": connect_timeout,
              "request_timeout": 30.0,
              "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=retries)}
    if endpoint:
        url = urlparse(endpoint)
        kwargs["endpoint_override"] = url.netloc
        kwargs["scheme"] = url.scheme
        kwargs["allow_bucket_creation"] = True if allow_bucket_creation is None \
            else allow_bucket_creation
        if (emulator or is_loopback(endpoint)) and not os.environ.get("AWS_ACCESS_KEY_ID"):
            from hybridray.storage.s3server import EMULATOR_ACCESS_KEY, EMULATOR_SECRET_KEY

            kwargs["access_key"] = EMULATOR_ACCESS_KEY
            kwargs["secret_key"] = EMULATOR_SECRET_KEY
    elif allow_bucket_creation is not None:
        kwargs["allow_bucket_creation"] = allow_bucket_creation
    return pafs.S3FileSystem(**kwargs)


def is_loopback(endpoint: str) -> bool:
    """True for ``http(s)://127.x.x.x``, ``localhost`` or ``[::1]`` endpoints."""
    host = urlparse(endpoint).hostname or ""
    return host == "localhost" or host.startswith("127.") or host == "::1"


@dataclass(frozen=True)
class DatasetAddress:
    """``site:relative/path`` resolved against a topology."""

    site: str
    path: str          # relative to the site's storage root

    def __str__(self) -> str:
        return f"{self.site}:{self.path}"

    def resolve(self, topology: Topology):
        """(filesystem, absolute path inside it) for this address."""
        fs, base = site_filesystem(topology.sites[self.site])
        return fs, f"{base}/{self.path}" if base else self.path

    def uri(self, topology: Topology) -> str:
        root = topology.sites[self.site].storage.root.rstrip("/")
        return f"{root}/{self.path}"


def parse_address(text: str, topology: Topology) -> DatasetAddress:
    """Parse ``site:path`` (e.g. ``onprem:datasets/tickets``), checking the site exists."""
    m = _ADDRESS.match(text.strip())
    if not m:
        raise ConfigError(f"{text!r}: expected SITE:PATH, e.g. onprem:datasets/tickets")
    site, path = m["site"], m["path"].strip("/")
    if site not in topology.sites:
        raise ConfigError(f"{text!r}: unknown site {site!r}; cluster {topology.name!r} has "
                          f"{', '.join(topology.sites)}")
    if not path or any(part in ("..", ".") for part in path.split("/")):
        raise ConfigError(f"{text!r}: the path must be non-empty and relative, without . or ..")
    return DatasetAddress(site, path)
