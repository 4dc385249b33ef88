"""``verify_dataset``: re-read every part of a committed version and check it against the
manifest (sha256, size, rows, schema), at the site that stores it.

The reads run as Ray tasks placed at the dataset's site (with the manifest's data class, so
they land only on nodes allowed to hold it, and without pulling the bytes over a link). With
no Ray connection, or ``local=True``, they run in this process instead, under the residency
rule of a driver: decoding pages (``full``) is refused unless this process runs at a site
that may hold the dataset's class, and without that a local check compares sha256 and size
only (it never opens a key or a page).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from hybridray.exceptions import IntegrityError
from hybridray.storage.readers import open_dataset

VERIFY_BATCH = 8


@dataclass
class VerifyReport:
    address: str
    version: int
    parts: int
    rows: int
    bytes: int
    seconds: float
    problems: list[str] = field(default_factory=list)
    site: str = ""
    checked: str = "sha256, size, rows, schema"

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_dataset(address: str, *, cluster=None, version: int | None = None,
                   full: bool = False, local: bool = False,
                   home: str | os.PathLike | None = None, raise_on_error: bool = True
                   ) -> VerifyReport:
    """Check every part of ``address`` (current version by default).

    Args:
        full: also decode every page (checking Parquet page CRCs), not only sha256 and footer.
        local: read in this process rather than in tasks at the dataset's site.

    Raises:
        IntegrityError: any part is missing, or differs from the manifest (all listed).
    """
    import ray

    from hybridray.placement.compile import task_options
    from hybridray.placement.guard import may_hold_here
    from hybridray.placement.workload import Workload
    from hybridray.storage import parts as P

    started = time.perf_counter()
    if cluster is None and not local:
        from hybridray.api import connect

        cluster = connect()
    ds = open_dataset(address, cluster=cluster, version=version, home=home)
    m = ds.manifest
    expects = [{"path": p.path, "sha256": p.sha256, "bytes": p.bytes, "rows": p.rows,
                "schema_fp": m.schema_.fingerprint} for p in m.parts]
    ctx = P.DestContext(ds.store, ds.address.site, ds.address.site, m.data_class,
                        cluster.name if cluster else "", ds.keys)
    where, checked = ds.address.site, "sha256, size, rows, schema" + (", pages" if full else "")
    if local or not ray.is_initialized():
        decode = True
        if full:
            ds._check_here(None)     # decoding here: refused (audited) where it may not be held
        elif not may_hold_here(m.data_class):
            decode, checked = False, "sha256, size"    # bytes only: no key, no page opened
        where = "this process"
        results = [r for i in range(0, len(expects), VERIFY_BATCH)
                   for r in _verify_here(ctx, expects[i:i + VERIFY_BATCH], full, decode=decode)]
    else:
        placement = cluster.place(Workload(
            name=f"verify {ds.address}", kind="data", cpus=1, data_classes=(m.data_class,),
            site=ds.address.site, burst=False, data_site=ds.address.site)).raise_if_refused()
        fn = ray.remote(P.verify_parts).options(**task_options(placement))
        refs = [fn.remote(ctx, expects[i:i + VERIFY_BATCH], full)
                for i in range(0, len(expects), VERIFY_BATCH)]
        from hybridray.storage.sync import _get

        results = [r for batch in _get(refs) for r in batch]
    problems = [f"{ds.address}/{r['path']}: {p}" for r in results for p in r["problems"]]
    report = VerifyReport(str(ds.address), m.version, len(m.parts), m.rows, m.bytes,
                          time.perf_counter() - started, problems, where, checked)
    if cluster is not None:
        cluster.audit.record("verify", address=str(ds.address), version=m.version,
                             parts=len(m.parts), ok=report.ok, problems=problems[:50],
                             checked=checked, where=where, cluster=cluster.name)
    if problems and raise_on_error:
        raise IntegrityError(f"{ds.address} version {m.version}: {len(problems)} problem(s) "
                             f"in {len(m.parts)} part(s); rewrite them from the source with "
                             "hybridray sync --checksum SRC DST", problems)
    return report


def _verify_here(ctx, expects, full, *, decode: bool = True):
    """``verify_parts`` in this process (not a Ray worker; the caller checked residency).
    Without ``decode`` only sha256 and size are compared: no key, no page is opened."""
    import hashlib

    from hybridray.exceptions import DataError
    from hybridray.storage.parts import check_bytes

    out = []
    for part in expects:
        try:
            data = ctx.store.get(part["path"])
        except DataError as e:
            out.append({"path": part["path"], "problems": [str(e)]})
            continue
        out.append({"path": part["path"], "problems": check_bytes(data, part, ctx.keys,
                                                                  full=full, parse=decode),
                    "sha256": hashlib.sha256(data).hexdigest()})
    return out
