"""``sync_dataset``: move a dataset from one site to another, masked, verified and atomic.

The driver only plans and commits; the bytes move in Ray. In order:

1. **Classify and refuse early.** The source's class comes from its manifest or a
   declaration (``restricted`` when neither: deny by default); masking may lower it. Both
   stages are placed with ``Cluster.place`` (so the decisions are audited); a destination that
   may not hold the output's class is refused here, before any byte moves.
2. **Plan.** List the source, carry unchanged files, probe the rest at the source (sha256,
   row groups, schema, in tasks placed there), cut them into parts (``plan``).
3. **Move.** A Ray Data pipeline: ``from_items(part specs)`` → ``map_batches(encode)`` with the
   source's ``ray_remote_args`` (read, mask, scan, encrypt: raw bytes never leave the source
   site) → ``map_batches(write)`` with the destination's (write the part, read it back, check
   sha256, rows and schema). Parts staged by an interrupted sync are verified and adopted
   instead of moved again.
4. **Commit.** Manifest, then ``_CURRENT`` (``manifest``); then delete what no kept version
   names. Bytes per (source, destination) go to the audit log as they move, with the
   link's egress price.

A lease on the destination keeps two syncs from committing over each other. Whatever fails,
nothing is committed: the previous version stays current and readable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Any

from hybridray.exceptions import DataError, HybridRayError, PlacementRefused
from hybridray.placement.compile import task_options
from hybridray.placement.workload import Workload
from hybridray.storage import masking as masking_mod
from hybridray.storage import parts as P
from hybridray.storage import plan as plan_mod
from hybridray.storage.encryption import key_ring
from hybridray.storage.fs import parse_address
from hybridray.storage.manifest import (
    DatasetStore,
    LeaseKeeper,
    Manifest,
    Part,
    SchemaInfo,
    new_owner,
    now_iso,
)
from hybridray.storage.objects import dataset_store, ensure_emulated_bucket
from hybridray.storage.report import Progress, RichProgress, SyncResult, no_progress
from hybridray.storage.secrets import ClusterSecrets
from hybridray.topology.models import DataClass
from hybridray.waiting import waiting

PROBE_BATCH = 8          # files per probe task
AUDIT_EVERY_S = 5.0      # flush transfer records at least this often while bytes move


def sync_dataset(source: str, destination: str, *, cluster=None, mask=None,
                 data_class: DataClass | str | None = None, overwrite: bool = False,
                 checksum: bool = False, keep_versions: int = 3,
                 part_bytes: int = plan_mod.DEFAULT_PART_BYTES, cpus: float = 1.0,
                 progress: bool | Progress | None = None, queue: bool = False) -> SyncResult:
    """Sync the dataset at ``source`` to ``destination`` (both ``SITE:PATH``).

    Args:
        cluster: a connected ``hybridray.Cluster`` (default: ``hybridray.connect()``).
        mask: a masking spec (``MaskingSpec``, dict, or YAML path) applied at the source.
        data_class: the source's class when it has no manifest (default: restricted).
        overwrite: replace a destination that holds a different dataset.
        checksum: re-hash every source file instead of trusting unchanged size and mtime.
        keep_versions: committed versions kept at the destination (older ones are deleted).
        part_bytes: target size of a re-encoded part.
        cpus: CPUs per read and per write task.
        progress: True for a live bar on stderr, or a callable ``(event, info)``.
        queue: wait for CPUs that actors hold at either site instead of being refused; any
            wait for resources is reported and gives up at ``$HYBRIDRAY_WAIT_TIMEOUT_S``.

    Returns:
        A ``SyncResult``: ``outcome`` is ``committed`` or ``up-to-date``.

    Raises:
        PlacementRefused: the destination may not hold the data's class (rule ``residency``).
        DataError: a bad source, destination or storage; nothing was committed.
        MaskingError: a masking rule is invalid or left a raw value behind.
    """
    from hybridray.api import connect

    cluster = cluster or connect()
    report = RichProgress() if progress is True else (progress or no_progress)
    run = _Run(cluster, source, destination, report)
    try:
        result = run.execute(mask=mask, declared=data_class, overwrite=overwrite,
                             checksum=checksum, keep=keep_versions, part_bytes=part_bytes,
                             cpus=cpus, queue=queue)
    except BaseException as e:
        run.fail(e)
        raise
    finally:
        report("end", {})
    return result


class _Run:
    """One sync: its addresses, stores, decisions and running totals."""

    def __init__(self, cluster, source: str, destination: str, report: Progress):
        self.cluster = cluster
        self.topology = cluster.topology
        self.src = parse_address(source, self.topology)
        self.dst = parse_address(destination, self.topology)
        self.report = report
        self.sync_id = new_owner()
        self.started = time.perf_counter()
        self.moved_unaudited = 0
        self.bytes_read = 0
        self.last_audit = time.monotonic()
        self.outcome_recorded = False
        self.phases: dict[str, float] = {}
        self._current: str | None = None
        self._mark = self.started
        if self.src.site == self.dst.site and (
                self.src.path == self.dst.path or self.dst.path.startswith(self.src.path + "/")
                or self.src.path.startswith(self.dst.path + "/")):
            raise DataError(f"{self.src} and {self.dst} overlap; sync to a separate path")

    # -- the whole sync -----------------------------------------------------------------------
    def execute(self, *, mask, declared, overwrite: bool, checksum: bool, keep: int,
                part_bytes: int, cpus: float, queue: bool = False) -> SyncResult:
        self._phase("plan")
        spec = masking_mod.load_spec(mask)
        home = getattr(self.cluster.state, "home", None)
        secrets = ClusterSecrets(self.cluster.name, home)
        src_store = dataset_store(self.topology, self.src)
        self._say(f"listing {self.src}")
        source = plan_mod.discover(src_store, self.src, self.src.uri(self.topology),
                                   signing_key=secrets.signing_key())
        src_class, how = plan_mod.resolve_class(source, declared,
                                                self.topology.default_data_class)
        out_class = spec.output_class_for(src_class) if spec else src_class
        src_pl, dst_pl = self._place(src_class, out_class, how, spec, cpus, queue)

        dst_site = self.topology.sites[self.dst.site]
        encrypt = dst_site.storage.encrypt_at_rest
        read_ids = [source.manifest.encryption["footer_key"]] if (
            source.manifest and source.manifest.encryption) else []
        src_keys = key_ring(secrets, read_ids=read_ids, data_class=src_class) \
            if read_ids else None
        dst_keys = key_ring(secrets, footer_site=self.dst.site, data_class=out_class) \
            if encrypt else None
        salt = secrets.salt() if spec else None
        masking_fp = spec.fingerprint(secrets.salt_id()) if spec else None
        transform = plan_mod.transform_fp(masking_fp, dst_keys.footer_key if dst_keys else None,
                                          "zstd")

        dst_store = dataset_store(self.topology, self.dst)
        ensure_emulated_bucket(dst_store)
        dst = DatasetStore(dst_store, secrets.signing_key())
        dst.acquire(self.sync_id)
        self.lease = LeaseKeeper(dst, self.sync_id)
        try:
            with self.lease, waiting(f"sync {self.src} → {self.dst}"):
                return self._sync(source, dst, spec, salt, masking_fp, src_class, out_class,
                                  src_pl, dst_pl, src_keys, dst_keys, transform, overwrite,
                                  checksum, keep, part_bytes)
        finally:
            with contextlib.suppress(HybridRayError):
                dst.release(self.sync_id)

    def _sync(self, source, dst: DatasetStore, spec, salt, masking_fp, src_class, out_class,
              src_pl, dst_pl, src_keys, dst_keys, transform, overwrite, checksum, keep,
              part_bytes) -> SyncResult:
        cur = dst.current()
        prev = dst.manifest() if cur else None
        prev = self._check_destination(dst, prev, overwrite)
        dataset_id = prev.dataset_id if prev else new_owner()
        dctx = P.DestContext(dst.store, self.dst.site, self.src.site, out_class,
                             self.cluster.name, dst_keys)
        stored = dst.parts()
        if checksum and prev is not None and prev.transform == transform:
            for path in self._damaged(dst_pl, dctx, prev):
                stored.pop(path, None)  # rewritten below, like a part that went missing

        plan = plan_mod.carry(source, prev, transform, stored, checksum=checksum)
        sctx = P.SourceContext(source.store, self.src.site, src_class, spec, salt, src_keys,
                               dst_keys)
        if plan.to_probe:
            self._say(f"reading {len(plan.to_probe)} new or changed file(s) at {self.src.site}")
            self._phase("probe")
            self._probe(src_pl, sctx, source, plan.to_probe)
            self._phase("plan")
        changed = plan_mod.carry_probed(plan, source, prev, transform, stored)
        plan_mod.check_schemas(source)
        schema = self._output_schema(source, spec, prev, changed, src_class)
        sctx = P.SourceContext(source.store, self.src.site, src_class, spec, salt, src_keys,
                               dst_keys, schema_fp=schema.fingerprint)
        copy_ok = spec is None and dst_keys is None and src_keys is None
        todo = [pp for name in changed for pp in plan_mod.plan_parts(
            source.files[name], transform, copy_ok=copy_ok, part_bytes=part_bytes)]

        planned = {pp.path: pp for pp in todo}
        self._phase("adopt")
        adopted = self._adopt(dst_pl, dctx, todo, stored, schema.fingerprint)
        todo = [pp for pp in todo if pp.path not in adopted]
        self._phase("move")
        written = self._move(src_pl, dst_pl, sctx, dctx, todo) if todo else {}
        self._phase("commit")

        new_parts = [Part(path=path, sha256=rec["sha256"], bytes=rec["bytes"],
                          rows=rec["rows"], source=planned[path].source_ref())
                     for path, rec in {**adopted, **written}.items()]
        parts = sorted([p for ps in plan.carried.values() for p in ps] + new_parts,
                       key=lambda p: (p.source.file, p.source.row_groups or (0, 0)))
        result = SyncResult(
            source=str(self.src), destination=str(self.dst), outcome="committed",
            version=cur.version if cur else None, previous_version=cur.version if cur else None,
            sync_id=self.sync_id, dataset_id=dataset_id, source_class=src_class.value,
            data_class=out_class.value, files=len(source.files), files_changed=len(changed),
            files_unchanged=len(plan.carried), files_deleted=len(plan.deleted),
            parts_written=len(written), parts_adopted=len(adopted),
            parts_carried=sum(len(v) for v in plan.carried.values()),
            rows=sum(p.rows for p in parts), rows_moved=sum(r["rows"] for r in written.values()),
            bytes=sum(p.bytes for p in parts),
            bytes_moved=sum(r["bytes"] for r in written.values()),
            bytes_read=self.bytes_read if written else 0,
            masked=bool(spec and any(r.rule != "keep" for r in spec.columns.values())),
            masking=masking_mod.actions(spec, src_class),
            encrypted=dst_keys is not None,
            sites={"read": sorted({r["source_site"] for r in written.values()}),
                   "write": sorted({r["site"] for r in written.values()})})
        unchanged = (prev is not None and not new_parts and not plan.deleted
                     and [p.path for p in parts] == [p.path for p in prev.parts]
                     and prev.data_class == out_class)
        if unchanged:
            result.outcome = "up-to-date"
        else:
            self._check_stored(dst, parts)
            manifest = Manifest(
                dataset_id=dataset_id, version=(cur.version + 1) if cur else 1,
                parent=cur.version if cur else None, committed_at=now_iso(),
                data_class=out_class,
                source={"address": str(self.src), "data_class": src_class.value,
                        "dataset_id": source.manifest.dataset_id if source.manifest else None,
                        "version": source.manifest.version if source.manifest else None},
                masking={"fingerprint": masking_fp, "spec": spec.model_dump(mode="json")}
                if spec else None,
                encryption=dst_keys.describe() if dst_keys else None, transform=transform,
                schema=schema, rows=result.rows, bytes=result.bytes, parts=parts)
            self.lease.check()  # renewed all along, and still ours: or nothing is committed
            committed = dst.commit(manifest, expect=cur)
            result.version = committed.version
            self._say(f"committed {self.dst} version {committed.version}")
            result.garbage_collected = sum(dst.collect_garbage(keep))
        self._flush_transfers(force=True)
        self._phase("done")
        result.phases = {k: round(v, 3) for k, v in self.phases.items()}
        result.seconds = time.perf_counter() - self.started
        result.cost = self.topology.egress_cost(self.src.site, self.dst.site, result.bytes_moved)
        self.cluster.audit.record("sync", **{k: v for k, v in result.to_json().items()
                                             if k != "sites"}, cluster=self.cluster.name)
        self.outcome_recorded = True
        return result

    # -- deciding -----------------------------------------------------------------------------
    def _place(self, src_class, out_class, how: str, spec, cpus: float, queue: bool = False):
        """Place both stages (audited); refuse a destination below the output's class."""
        src_wl = Workload(name=f"sync read {self.src}", kind="data", cpus=cpus,
                          data_classes=(src_class,), site=self.src.site, burst=False,
                          data_site=self.src.site, queue=queue)
        src_pl = self.cluster.place(src_wl, max_age_s=0)      # what Ray has free now
        dst_wl = Workload(name=f"sync write {self.dst}", kind="data", cpus=cpus,
                          data_classes=(out_class,), site=self.dst.site, burst=False,
                          data_site=self.src.site, queue=queue)
        dst_pl = self.cluster.place(dst_wl, max_age_s=0)
        limit = self.topology.sites[self.dst.site].max_data_class
        if out_class > limit:
            allowed = self.topology.sites_by_class[out_class]
            default = (" (no class declared or recorded, so "
                       f"{self.topology.default_data_class.value} by default: the cluster's "
                       "default_data_class)") if how == "default" else ""
            after = f", still {out_class.value} after masking" if spec else ""
            fix = (f"mask it to {limit.value} or lower before it leaves (--mask SPEC with "
                   f"output_class: {limit.value}), or sync it to a site that may hold "
                   f"{out_class.value}: {', '.join(allowed) or 'none'}")
            if how == "default":
                fix += "; if the data is less sensitive, declare it with --data-class"
            refusal = PlacementRefused(
                f"refusing to sync {self.src} ({src_class.value}{default}{after}) to "
                f"{self.dst}: site {self.dst.site} may hold up to {limit.value}",
                rule="residency", fix=fix)
            self._record_refusal(refusal)
            raise refusal
        for pl in (src_pl, dst_pl):
            if not pl.ok:
                try:
                    pl.raise_if_refused()
                except PlacementRefused as e:
                    self._record_refusal(e)
                    raise
        return src_pl, dst_pl

    def _record_refusal(self, e: PlacementRefused) -> None:
        self.cluster.audit.record("sync", outcome="refused", source=str(self.src),
                                  destination=str(self.dst), sync_id=self.sync_id,
                                  rule=e.rule, message=str(e), fix=e.fix, bytes_moved=0,
                                  cluster=self.cluster.name)
        self.outcome_recorded = True

    def _check_destination(self, dst: DatasetStore, prev: Manifest | None,
                           overwrite: bool) -> Manifest | None:
        """The previous version to build on, or None; refuses another dataset's place."""
        if prev is not None and prev.source.get("address") != str(self.src):
            if not overwrite:
                raise DataError(
                    f"{self.dst} holds another dataset (synced from "
                    f"{prev.source.get('address')}, version {prev.version}); sync to another "
                    "path, or pass --overwrite to replace it")
            return None
        if prev is None:
            foreign = dst.foreign()
            if foreign and not overwrite:
                shown = ", ".join(foreign[:3]) + (" …" if len(foreign) > 3 else "")
                raise DataError(f"{self.dst} already holds {len(foreign)} file(s) that "
                                f"hybridray did not write ({shown}); sync to an empty path, or "
                                "pass --overwrite (hybridray readers then ignore those files; "
                                "they are not deleted)")
        return prev

    def _output_schema(self, source, spec, prev: Manifest | None, changed: list[str],
                       src_class: DataClass) -> SchemaInfo:
        probed = next((source.files[n] for n in changed if source.files[n].schema), None)
        if probed is None:
            if prev is None:
                raise DataError(f"{self.src}: no file to take the schema from")
            return prev.schema_
        schema = P.schema_from_b64(probed.schema)
        if spec is not None:
            try:
                masking_mod.check_coverage(spec, schema, src_class, str(self.src))
            except HybridRayError as e:
                self.cluster.audit.refusal(e, what="mask", rule="masking",
                                           source=str(self.src), destination=str(self.dst),
                                           sync_id=self.sync_id, cluster=self.cluster.name)
                self.outcome_recorded = True
                raise
            schema = masking_mod.check_against_schema(spec, schema, str(self.src))
        return SchemaInfo(fingerprint=P.schema_fp(schema), fields=P.schema_fields(schema),
                          arrow=P.schema_b64(schema))

    # -- moving -------------------------------------------------------------------------------
    def _probe(self, placement, sctx, source, names: list[str]) -> None:
        import ray

        fn = ray.remote(P.probe_files).options(**task_options(placement))
        chunks = [names[i:i + PROBE_BATCH] for i in range(0, len(names), PROBE_BATCH)]
        refs = [fn.remote(sctx, chunk) for chunk in chunks]
        results = [r for batch in _get(refs) for r in batch]
        bad = [r for r in results if "error" in r]
        if bad:
            lines = "\n  ".join(f"{r['file']}: {r['error']}" for r in bad[:20])
            raise DataError(f"{self.src}: {len(bad)} source file(s) cannot be read; fix or "
                            f"remove them and rerun:\n  {lines}")
        for r in results:
            info = source.files[r["file"]]
            info.sha256, info.size, info.rows = r["sha256"], r["size"], r["rows"]
            info.row_groups = [tuple(g) for g in r["row_groups"]]
            info.schema_fp, info.schema = r["schema_fp"], r["schema"]

    def _adopt(self, placement, dctx, todo, stored: dict[str, int], out_fp: str
               ) -> dict[str, dict[str, Any]]:
        """Verify parts an interrupted sync staged, and keep the good ones."""
        import ray

        staged = [pp for pp in todo if pp.path in stored]
        if not staged:
            return {}
        self._say(f"verifying {len(staged)} part(s) staged by an interrupted sync")
        expects = [{"path": pp.path, "rows": pp.rows, "bytes": stored[pp.path],
                    "sha256": pp.info.sha256 if pp.mode == "copy" else None,
                    "schema_fp": pp.info.schema_fp if pp.mode == "copy" else out_fp}
                   for pp in staged]
        fn = ray.remote(P.verify_parts).options(**task_options(placement))
        refs = [fn.remote(dctx, expects[i:i + PROBE_BATCH])
                for i in range(0, len(expects), PROBE_BATCH)]
        return {r["path"]: {**r, "rows": next(e["rows"] for e in expects
                                              if e["path"] == r["path"])}
                for batch in _get(refs) for r in batch if not r["problems"]}

    def _damaged(self, placement, dctx, prev: Manifest) -> list[str]:
        """Kept parts that no longer match the manifest (``checksum=True``)."""
        import ray

        self._say(f"re-verifying {len(prev.parts)} kept part(s) at {self.dst.site}")
        expects = [{"path": p.path, "sha256": p.sha256, "bytes": p.bytes, "rows": p.rows,
                    "schema_fp": prev.schema_.fingerprint} for p in prev.parts]
        fn = ray.remote(P.verify_parts).options(**task_options(placement))
        refs = [fn.remote(dctx, expects[i:i + PROBE_BATCH])
                for i in range(0, len(expects), PROBE_BATCH)]
        bad = [r["path"] for batch in _get(refs) for r in batch if r["problems"]]
        if bad:
            self._say(f"{len(bad)} kept part(s) are damaged and will be rewritten")
        return bad

    def _move(self, src_pl, dst_pl, sctx, dctx, todo) -> dict[str, dict[str, Any]]:
        """The Ray Data pipeline: encode at the source, write and verify at the destination."""
        import ray

        from hybridray.placement.compile import data_remote_args

        sizes = {pp.path: pp.info.size if pp.mode == "copy" else _part_size(pp) for pp in todo}
        total = sum(sizes.values())
        self.bytes_read = total
        self.report("start", {"parts": len(todo), "bytes": total})
        items = [{"spec": json.dumps(pp.spec())} for pp in todo]
        written: dict[str, dict[str, Any]] = {}
        with _quiet_ray_data():
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            ds = ds.map_batches(P.encode_batch, batch_size=1, batch_format="pyarrow",
                                fn_kwargs={"ctx": sctx}, concurrency=_slots(src_pl),
                                **data_remote_args(src_pl))
            ds = ds.map_batches(P.write_batch, batch_size=1, batch_format="pyarrow",
                                fn_kwargs={"ctx": dctx}, concurrency=_slots(dst_pl),
                                **data_remote_args(dst_pl))
            batches = ds.iter_batches(batch_size=None, batch_format="pyarrow")
            try:
                for batch in batches:
                    for text in batch.column("record").to_pylist():
                        rec = json.loads(text)
                        if "error" in rec:  # stops the pipeline: nothing is committed
                            P.raise_error_record(rec["error"])
                        written[rec["path"]] = rec
                        self.moved_unaudited += rec["bytes"]
                        self.report("part", {**rec, "source_bytes": sizes.get(rec["path"],
                                                                              rec["bytes"])})
                        self._flush_transfers()
            except Exception as e:
                raise _unwrap(e) from None
            finally:  # on an error record or Ctrl-C: shut the pipeline down now, not at GC
                close = getattr(batches, "close", None)
                if close is not None:
                    with contextlib.suppress(Exception):
                        close()
        return written

    def _check_stored(self, dst: DatasetStore, parts: list[Part]) -> None:
        """Every part the new manifest names is stored, at its recorded size."""
        stored = dst.parts()
        bad = [p.path for p in parts if stored.get(p.path) != p.bytes]
        if bad:
            raise DataError(f"{self.dst}: {len(bad)} part(s) vanished or changed while the sync "
                            f"ran ({', '.join(bad[:3])}); nothing committed, rerun the sync")

    # -- accounting ---------------------------------------------------------------------------
    def _flush_transfers(self, force: bool = False) -> None:
        if not self.moved_unaudited:
            return
        if not force and time.monotonic() - self.last_audit < AUDIT_EVERY_S:
            return
        nbytes, self.moved_unaudited = self.moved_unaudited, 0
        self.last_audit = time.monotonic()
        self.cluster.audit.transfer(
            self.src.site, self.dst.site, nbytes,
            self.topology.egress_cost(self.src.site, self.dst.site, nbytes),
            sync_id=self.sync_id, source=str(self.src), destination=str(self.dst),
            cluster=self.cluster.name)

    def fail(self, e: BaseException) -> None:
        with contextlib.suppress(Exception):
            self._flush_transfers(force=True)
            if not self.outcome_recorded:
                self.cluster.audit.record("sync", outcome="failed", source=str(self.src),
                                          destination=str(self.dst), sync_id=self.sync_id,
                                          error=f"{type(e).__name__}: {e}"[:2000],
                                          cluster=self.cluster.name)

    def _say(self, message: str) -> None:
        self.report("stage", {"message": message})

    def _phase(self, name: str) -> None:
        """Close the running phase (its seconds go into the result) and start ``name``."""
        now = time.perf_counter()
        if self._current is not None:
            self.phases[self._current] = self.phases.get(self._current, 0.0) + now - self._mark
        self._current, self._mark = name, now


def _slots(placement) -> int:
    """Tasks of a stage that fit at its site at once (the site's CPUs / CPUs per task)."""
    c = placement.primary
    return max(1, min(c.units_free if c.units_free else c.units_max, 64))


def _part_size(pp) -> int:
    groups = pp.info.row_groups or []
    first, last = pp.row_groups or (0, 0)
    return sum(b for _, b in groups[first:last])


def _get(refs: list) -> list:
    import ray

    try:
        return ray.get(refs)
    except Exception as e:
        raise _unwrap(e) from None


def _unwrap(e: BaseException) -> BaseException:
    """The ``HybridRayError`` a Ray task raised, out of Ray's and Ray Data's wrappers."""
    seen, todo = set(), [e]
    while todo:
        cur = todo.pop(0)
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, HybridRayError):
            return cur
        todo.extend([getattr(cur, "cause", None), cur.__cause__, cur.__context__])
    return e


@contextlib.contextmanager
def _quiet_ray_data():
    """Ray Data set up for moving parts, restored afterwards.

    No progress bars or per-dataset log lines (the sync reports its own). And the whole
    object store as Ray Data's budget rather than half: a part is one block of tens of MB,
    and on nodes with small object stores half of it holds a single part, which would run
    the pipeline one part at a time. ``concurrency`` per stage still caps the tasks.
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start,
             ctx.override_object_store_memory_limit_fraction)
    logger = logging.getLogger("ray.data")
    level = logger.level
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if ctx.override_object_store_memory_limit_fraction is None:
        ctx.override_object_store_memory_limit_fraction = 1.0
    logger.setLevel(logging.ERROR)  # also "progress bars disabled", said once per dataset
    try:
        yield
    finally:
        (ctx.enable_progress_bars, ctx.print_on_execution_start,
         ctx.override_object_store_memory_limit_fraction) = saved
        logger.setLevel(level)

