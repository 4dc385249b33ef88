"""Reading datasets the way hybridray wrote them: only committed versions, through manifests.

A directory listing of a dataset shows staged parts of interrupted syncs and parts of older
versions; only the manifest ``_CURRENT`` points at says which parts make up the dataset. So
every reader here (``hybridray ls``, ``open_dataset(...).read()``, ``.to_ray()`` for Ray
Data and training) resolves ``_CURRENT`` first, and decrypts with the cluster's keys when the
version is encrypted at rest.

    ds = hybridray.storage.open_dataset("cloud-a:datasets/tickets", cluster=cluster)
    ds.version, ds.rows, ds.schema
    table = ds.read(columns=["id", "body"])          # in this process
    rd = ds.to_ray()                                 # a Ray Data dataset, placed by its class

Reads are placed and guarded by the class the (signed) manifest records, whether or not Ray
is initialised: ``read()``/``iter_batches()`` check where *this process* runs (a worker's
node labels; a driver's recorded site) and ``to_ray()`` places its read tasks with a
placement decided for that class (or checks that the ``ray_remote_args`` given admit only
nodes allowed to hold it), and every read task checks its node again before it decrypts.
The decryption keys go only into those tasks. A refusal is ``ResidencyViolation`` (rule
``residency``) and is written to the audit log. The one override, ``override="REASON"``,
reads anyway and records the reason (see docs/security.md for when that is right).
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
from hybridray.topology.models import DataClass, Topology


@dataclass
class CommittedDataset:
    """One committed version of a dataset."""

    address: DatasetAddress
    store: ObjectStore
    manifest: Manifest
    keys: KeyRing | None = None
    topology: Topology | None = None
    cluster: Any = None

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
                     *, override: str | None = None) -> Iterator[Any]:
        """Record batches part by part (memory: one part's row group at a time).

        Refused (``ResidencyViolation``, audited) unless this process runs where the
        dataset's class may be held; ``override="REASON"`` reads anyway, audited.
        """
        self._check_here(override)
        for part in self.manifest.parts:
            yield from read_part(self.store, part.path, part.bytes, self.keys).iter_batches(
                batch_size=batch_size, columns=columns)

    def read(self, columns: list[str] | None = None, *, override: str | None = None):
        """The whole version as one ``pyarrow.Table`` (checked like ``iter_batches``)."""
        import pyarrow as pa

        schema = self.schema if columns is None else pa.schema(
            [self.schema.field(c) for c in columns])
        batches = list(self.iter_batches(columns, override=override))
        return pa.Table.from_batches(batches, schema=schema) if batches else schema.empty_table()

    def to_ray(self, *, override: str | None = None, **ray_remote_args):
        """A Ray Data dataset over this version's parts, read (and decrypted) in tasks that
        run only where the dataset's class may be held.

        With no ``ray_remote_args`` the reads are placed by the manifest's class near the
        data (an audited decision). Given ``ray_remote_args`` (a placement's
        ``data_remote_args``), their label selectors must admit only nodes allowed to hold
        the class, or the call is refused. Either way every read task checks its node
        before it touches a key or a byte.
        """
        import ray

        cls = self.manifest.data_class
        if not ray_remote_args:
            ray_remote_args = self._place_reads()
        elif override is None:
            self._check_selectors(ray_remote_args)
        else:
            self._audit_override(override, "to_ray")
        items = [{"path": p.path, "bytes": p.bytes} for p in self.manifest.parts]
        return ray.data.from_items(items, override_num_blocks=max(len(items), 1)).map_batches(
            _read_parts, batch_size=1, batch_format="pyarrow",
            fn_kwargs={"store": self.store, "keys": self.keys, "data_class": cls.value,
                       "override": override}, **ray_remote_args)

    # -- enforcement ------------------------------------------------------------------------
    def _place_reads(self) -> dict[str, Any]:
        from hybridray.placement.compile import data_remote_args
        from hybridray.placement.policy import decide
        from hybridray.placement.workload import Workload

        if self.topology is None:
            raise DataError("to_ray() without ray_remote_args needs the dataset opened with "
                            "cluster= or topology=, to place the reads by its class")
        wl = Workload(name=f"read {self.address}", kind="data", cpus=1,
                      data_classes=(self.manifest.data_class,), data_site=self.address.site,
                      preference="near-data")
        if self.cluster is not None:
            placement = self.cluster.place(wl)
        else:
            placement = decide(self.topology, wl)
        if not placement.ok:
            self._refuse(placement.refusal.message, placement.refusal.fix)
        return data_remote_args(placement)

    def _check_selectors(self, args: dict[str, Any]) -> None:
        """Every selector in ``args`` (primary and fallbacks) admits only allowed classes."""
        from hybridray import labels as L

        cls = self.manifest.data_class
        sels = [args.get("label_selector")] + [
            f.get("label_selector") for f in args.get("fallback_strategy") or ()]
        for sel in sels:
            admitted = _admitted_classes((sel or {}).get(L.MAX_DATA_CLASS))
            low = [c for c in admitted if DataClass(c) < cls]
            if admitted is None or low:
                self._refuse(
                    f"reading {self.address} ({cls.value}) with ray_remote_args whose label "
                    f"selector {sel or {}} admits nodes that may not hold {cls.value}",
                    "call to_ray() without ray_remote_args (placed by the dataset's class), "
                    "or pass data_remote_args(placement) of a placement with "
                    f"data_classes=[{cls.value!r}]")

    def _refuse(self, message: str, fix: str) -> None:
        from hybridray.exceptions import ResidencyViolation

        error = ResidencyViolation(message, fix=fix)
        self._audit(error)
        raise error

    def _audit(self, error: Exception) -> None:
        log = self._audit_log()
        if log is not None:
            log.refusal(error, what="dataset read", dataset=str(self.address),
                        data_class=self.manifest.data_class.value,
                        cluster=self.topology.name if self.topology else None)

    def _audit_log(self):
        if self.cluster is not None:
            return self.cluster.audit
        if self.topology is not None:
            from hybridray.audit import AuditLog

            return AuditLog.for_cluster(self.topology.name)
        return None

    def _audit_override(self, reason: str, how: str) -> None:
        if not reason.strip():
            raise DataError("override needs a reason (override=\"why this read may run "
                            "anywhere\"); it is written to the audit log")
        log = self._audit_log()
        if log is not None:
            log.record("override", what=f"dataset read ({how})", dataset=str(self.address),
                       data_class=self.manifest.data_class.value, reason=reason,
                       cluster=self.topology.name if self.topology else None)

    def _check_here(self, override: str | None) -> None:
        from hybridray.exceptions import ResidencyViolation
        from hybridray.placement.guard import check_residency

        if override is not None:
            self._audit_override(override, "read")
            return
        try:
            check_residency(self.manifest.data_class, what="dataset read")
        except ResidencyViolation as e:
            self._audit(e)  # also in the driver's own log when a worker's log is elsewhere
            raise


def read_part(store: ObjectStore, key: str, size: int, keys: KeyRing | None):
    from hybridray.storage.parts import open_parquet

    return open_parquet(store, key, size, keys)


def _admitted_classes(value: str | None) -> list[str] | None:
    """The classes a ``max-data-class`` selector value admits (None: any node at all)."""
    if not value:
        return None
    value = value.strip()
    if value.startswith("!"):
        return None  # a negation admits every other class
    if value.startswith("in(") and value.endswith(")"):
        return [v.strip() for v in value[3:-1].split(",") if v.strip()]
    return [value]


def _read_parts(batch, store: ObjectStore, keys: KeyRing | None, data_class: str = "restricted",
                override: str | None = None):
    import pyarrow as pa

    if override is None:  # the worker guard: this node, before any key or byte is used
        from hybridray.placement.guard import check_residency

        check_residency(data_class, what="dataset read task")

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
    _know_driver_site(cluster, topology)
    addr = parse_address(address, topology)
    store = dataset_store(topology, addr)
    manifest = DatasetStore(store, secrets.signing_key()).manifest(version)  # signed by us
    keys = None
    if manifest.encryption:
        keys = key_ring(secrets, read_ids=[manifest.encryption["footer_key"]],
                        data_class=manifest.data_class)
    return CommittedDataset(addr, store, manifest, keys, topology=topology, cluster=cluster)


def list_datasets(address: str, *, cluster=None, topology: Topology | None = None,
                  home: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Committed datasets at or under ``address`` (``site:`` for a whole site's storage)."""
    topology, secrets = _context(cluster, topology, home)
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
            ds = DatasetStore(store.child(rel) if rel else store, secrets.signing_key())
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


def _know_driver_site(cluster, topology: Topology) -> None:
    """Where this driver runs, when ``connect`` has not said so in this process."""
    from hybridray.placement.guard import _DRIVER

    state = getattr(cluster, "state", None)
    if not _DRIVER and state is not None and getattr(state, "address", None):
        from hybridray.api import _record_driver_site

        _record_driver_site(topology, state.address)


def _context(cluster, topology: Topology | None, home) -> tuple[Topology, ClusterSecrets]:
    if cluster is not None:
        topology = cluster.topology
        home = home or getattr(cluster.state, "home", None)
    if topology is None:
        raise DataError("pass cluster= (a connected hybridray.Cluster) or topology=")
    return topology, ClusterSecrets(topology.name, home)
