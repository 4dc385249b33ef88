"""Reading datasets the way hybridray wrote them: only committed versions, through manifests.

A directory listing of a dataset shows staged parts of interrupted syncs and parts of older
versions; only the manifest ``_CURRENT`` points at says which parts make up the dataset. So
every reader here (``hybridray ls``, ``open_dataset(...).read()``, ``.to_ray()`` for Ray
Data and training) resolves ``_CURRENT`` first, and decrypts with the cluster's keys when the
version is encrypted at rest.

    ds = hybridray.storage.open_dataset("cloud-a:datasets/tickets", cluster=cluster)
    ds.version, ds.rows, ds.schema
    table = ds.read(columns=["id", "body"])          # in this process
    rd = ds.to_ray(**data_remote_args(placement))    # a Ray Data dataset, placed
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from hybridray.exceptions import DataError
from hybridray.storage.encryption import KeyRing, key_ring
from hybridray.storage.fs import DatasetAddress, parse_address
from hybridray.storage.manifest import CURRENT, DatasetStore, Manifest
from hybridray.storage.objects import ObjectStore, dataset_store, site_store
from hybridray.storage.parts import schema_from_b64
from hybridray.storage.secrets import ClusterSecrets
from hybridray.topology.models import Topology


@dataclass
class CommittedDataset:
    """One committed version of a dataset."""

    address: DatasetAddress
    store: ObjectStore
    manifest: Manifest
    keys: KeyRing | None = None

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def data_class(self) -> str:
        return self.manifest.data_class.value

    @property
    def rows(self) -> int:
        return self.manifest.rows

    @property
    def schema(self):
        """The dataset's Arrow schema."""
        return schema_from_b64(self.manifest.schema_.arrow)

    @property
    def filesystem(self):
        """The pyarrow filesystem the parts live on."""
        return self.store.fs

    @property
    def paths(self) -> list[str]:
        """The parts of this version as paths inside ``filesystem``, in order."""
        return [self.store.fs_path(p.path) for p in self.manifest.parts]

    def iter_batches(self, columns: list[str] | None = None, batch_size: int = 65536,
                     *, check: bool = True) -> Iterator[Any]:
        """Record batches part by part (memory: one part's row group at a time)."""
        if check:
            self._check_here()
        for part in self.manifest.parts:
            yield from read_part(self.store, part.path, part.bytes, self.keys).iter_batches(
                batch_size=batch_size, columns=columns)

    def read(self, columns: list[str] | None = None, *, check: bool = True):
        """The whole version as one ``pyarrow.Table``."""
        import pyarrow as pa

        schema = self.schema if columns is None else pa.schema(
            [self.schema.field(c) for c in columns])
        batches = list(self.iter_batches(columns, check=check))
        return pa.Table.from_batches(batches, schema=schema) if batches else schema.empty_table()

    def to_ray(self, **ray_remote_args):
        """A Ray Data dataset over this version's parts (decrypted in the read tasks).

        Pass the ``data_remote_args`` of a placement for the reading site so the reads run
        where the data's class is allowed.
        """
        import ray

        if self.keys is None:
            return ray.data.read_parquet(self.paths, filesystem=self.filesystem,
                                         ray_remote_args=ray_remote_args or None)
        items = [{"path": p.path, "bytes": p.bytes} for p in self.manifest.parts]
        return ray.data.from_items(items, override_num_blocks=max(len(items), 1)).map_batches(
            _read_parts, batch_size=1, batch_format="pyarrow",
            fn_kwargs={"store": self.store, "keys": self.keys}, **ray_remote_args)

    def _check_here(self) -> None:
        import ray

        if ray.is_initialized():
            from hybridray.placement.guard import check_residency

            check_residency(self.manifest.data_class)


def read_part(store: ObjectStore, key: str, size: int, keys: KeyRing | None):
    from hybridray.storage.parts import open_parquet

    return open_parquet(store, key, size, keys)


def _read_parts(batch, store: ObjectStore, keys: KeyRing | None):
    import pyarrow as pa

    tables = [read_part(store, p, b, keys).read() for p, b in
              zip(batch.column("path").to_pylist(), batch.column("bytes").to_pylist(),
                  strict=True)]
    return pa.concat_tables(tables)


def open_dataset(address: str, *, cluster=None, topology: Topology | None = None,
                 version: int | None = None, home: str | os.PathLike | None = None
                 ) -> CommittedDataset:
    """The committed ``version`` (default: current) of the dataset at ``address``.

    Pass a connected ``Cluster`` (its topology, keys and home are used) or a ``topology``.
    """
    topology, secrets = _context(cluster, topology, home)
    addr = parse_address(address, topology)
    store = dataset_store(topology, addr)
    manifest = DatasetStore(store).manifest(version)
    keys = None
    if manifest.encryption:
        keys = key_ring(secrets, read_ids=[manifest.encryption["footer_key"]])
    return CommittedDataset(addr, store, manifest, keys)


def list_datasets(address: str, *, cluster=None, topology: Topology | None = None,
                  home: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Committed datasets at or under ``address`` (``site:`` for a whole site's storage)."""
    topology, _ = _context(cluster, topology, home)
    site, _, path = address.partition(":")
    if path.strip("/"):
        addr = parse_address(address, topology)
        store = dataset_store(topology, addr)
    else:
        if site not in topology.sites:
            parse_address(f"{site}:x", topology)  # raises, naming the known sites
        addr = DatasetAddress(site, "")
        store = site_store(site, topology.sites[site])
    out = []
    for key in sorted(store.list()):
        if key == CURRENT or key.endswith("/" + CURRENT):
            rel = key[: -len(CURRENT)].rstrip("/")
            ds = DatasetStore(store.child(rel) if rel else store)
            full = "/".join(x for x in (addr.path, rel) if x)
            try:
                m = ds.manifest()
            except DataError as e:
                out.append({"address": f"{site}:{full}", "error": str(e)})
                continue
            out.append({"address": f"{site}:{full}", "version": m.version,
                        "versions": ds.versions(), "data_class": m.data_class.value,
                        "rows": m.rows, "bytes": m.bytes, "parts": len(m.parts),
                        "committed_at": m.committed_at, "source": m.source.get("address"),
                        "masked": m.masking is not None, "encrypted": m.encryption is not None})
    return out


def _context(cluster, topology: Topology | None, home) -> tuple[Topology, ClusterSecrets]:
    if cluster is not None:
        topology = cluster.topology
        home = home or getattr(cluster.state, "home", None)
    if topology is None:
        raise DataError("pass cluster= (a connected hybridray.Cluster) or topology=")
    return topology, ClusterSecrets(topology.name, home)
