"""Fixtures for the data tests: a real S3 server on loopback, ticket datasets, and the shared
cluster seen with its cloud sites' storage on that server.

The cluster itself is the session's shared one (``hr_cluster`` from ``tests/conftest.py``);
these fixtures never start or stop Ray. A cloud site whose storage ``hybridray up`` already
serves from the cluster's loopback S3 server (cloud-b in clusters/local.yaml) keeps it; any
other (cloud-a) is pointed at a server started here, so both clouds are real S3.
"""

from __future__ import annotations

import datetime
import uuid
from pathlib import Path

import pytest

from hybridray.storage import s3server

EMAIL_RE = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
PHONE_RE = r"\+?\d{1,3}[ .-]\d{3}[ .-]\d{3}[ .-]\d{4}"


def tickets(n: int, *, start: int = 0, seed: int = 0):
    """A ticket table with PII in it: emails and phone numbers, also inside free text."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    ids = np.arange(start, start + n, dtype=np.int64)
    base = datetime.datetime(2024, 1, 1)
    return pa.table({
        "id": ids,
        "customer_email": [f"user{i}@example.com" for i in ids],
        "customer_phone": [f"+1 555 {100 + i % 900:03d} {1000 + i % 9000:04d}" for i in ids],
        "body": [f"ticket {i}: please call +1 555 010 {1000 + i % 9000:04d} or mail "
                 f"help{i}@corp.example.org" for i in ids],
        "created_at": pa.array([base + datetime.timedelta(minutes=int(i) * 7) for i in ids],
                               pa.timestamp("us")),
        "amount": rng.random(n) * 500,
    })


def write_tickets(root: Path, files: int = 4, rows: int = 400, *, row_group: int = 100,
                  seed: int = 0) -> int:
    """``files`` Parquet files of ``rows`` tickets each under ``root``; returns total rows."""
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        pq.write_table(tickets(rows, start=i * rows, seed=seed + i), root / f"part-{i:03d}.parquet",
                       row_group_size=row_group)
    return files * rows


@pytest.fixture(scope="session")
def s3_server():
    """A loopback S3 server (moto) for tests that need one of their own."""
    server = s3server.start()
    try:
        yield server
    finally:
        s3server.stop(server)


def emulated(topology, site: str) -> bool:
    storage = topology.sites[site].storage
    return storage.scheme == "s3" and bool(storage.endpoint)


INTERNAL_MASK = """\
# hybridray sync onprem:PATH cloud-b:PATH --mask THIS (tickets down to internal)
output_class: internal
columns:
  id: keep
  created_at: keep
  customer_email: hash
  customer_phone: drop
  body: drop
  amount: {rule: generalize, bucket: 100}
"""


@pytest.fixture
def internal_mask(tmp_path) -> Path:
    """A mask that takes tickets down to internal (what cloud-b may hold)."""
    path = tmp_path / "internal.yaml"
    path.write_text(INTERNAL_MASK)
    return path


@pytest.fixture(scope="session")
def s3_cluster(hr_cluster, request):
    """``hr_cluster`` with both cloud sites' storage on real S3 servers on 127.0.0.1.

    cloud-b is served by the cluster's own server (``hybridray up`` starts it for
    clusters/local.yaml); cloud-a, a directory in that file, is pointed at this session's
    server. cloud-b encrypts at rest.
    """
    import hybridray
    from hybridray.topology import load_topology

    state = hr_cluster.state
    overrides = ["sites.cloud-b.storage.encrypt_at_rest=true"]
    for site in ("cloud-a", "cloud-b"):
        if not emulated(hr_cluster.topology, site):
            server = request.getfixturevalue("s3_server")
            overrides += [f"sites.{site}.storage.root=s3://hybridray-test-{site}/data",
                          f"sites.{site}.storage.endpoint={server.endpoint}"]
    topology = load_topology(state.source_file, [*state.overrides, *overrides])
    return hybridray.Cluster(topology, audit=hr_cluster.audit, state=state)


@pytest.fixture
def name() -> str:
    """A dataset path no other test uses."""
    return f"datasets/t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def onprem_root(s3_cluster) -> Path:
    return Path(s3_cluster.topology.sites["onprem"].storage.path)
