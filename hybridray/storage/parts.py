"""What runs inside Ray workers: probe source files, encode parts at the source, write and
verify them at the destination.

Every function here starts with ``check_site``: the node it landed on must be at the site the
placement chose *and* carry a ``hybridray.io/max-data-class`` that admits the data it is about
to touch (``check_residency``). Placement already keeps work there; this is the check that
holds even if a selector was wrong.

A part travels from the source stage to the destination stage as one Ray Data row: its
Parquet bytes (masked, and encrypted when the destination asks for it, before they leave the
source) plus what the destination must find when it reads them back: sha256, rows, schema.
"""

from __future__ import annotations

import base64
import hashlib
import io
import pickle
import time
from dataclasses import dataclass, field
from typing import Any

from hybridray.exceptions import DataError, HybridRayError, IntegrityError
from hybridray.storage.encryption import KeyRing
from hybridray.storage.masking import MaskingSpec
from hybridray.storage.objects import ObjectStore
from hybridray.topology.models import DataClass

# Parts up to this size are read in one request (one GET on S3) rather than ranged reads.
WHOLE_READ_MAX = 256 << 20


@dataclass(frozen=True)
class SourceContext:
    """What the source stage needs: where to read, how to mask, how to encrypt."""

    store: ObjectStore
    site: str
    data_class: DataClass
    masking: MaskingSpec | None = None
    salt: bytes | None = field(default=None, repr=False)
    read_keys: KeyRing | None = None      # opens an encrypted source
    write_keys: KeyRing | None = None     # encrypts for the destination
    schema_fp: str = ""                    # every encoded part must have this output schema
    compression: str = "zstd"


@dataclass(frozen=True)
class DestContext:
    """What the destination stage needs: where to write, how to read back, what to count."""

    store: ObjectStore
    site: str
    src_site: str
    data_class: DataClass
    cluster: str
    keys: KeyRing | None = None


def check_site(site: str, data_class: DataClass) -> str:
    """Residency check inside the worker, plus: this node is at ``site``."""
    from hybridray.placement.guard import check_residency

    here = check_residency(data_class)
    if here != site:
        from hybridray.exceptions import ResidencyViolation

        raise ResidencyViolation(f"this stage must run at {site}, but the node is at {here}",
                                 fix="place the stage with hybridray (label_selector on "
                                     "hybridray.io/site)")
    return here


# ---- schemas ------------------------------------------------------------------------------

def schema_fp(schema) -> str:
    """Fingerprint of column names and types (metadata and nullability ignored)."""
    body = "\n".join(f"{f.name}\t{f.type}" for f in schema)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def schema_fields(schema) -> list[tuple[str, str]]:
    return [(f.name, str(f.type)) for f in schema]


def schema_b64(schema) -> str:
    return base64.b64encode(schema.remove_metadata().serialize().to_pybytes()).decode()


def schema_from_b64(text: str):
    import pyarrow as pa

    return pa.ipc.read_schema(pa.BufferReader(base64.b64decode(text)))


def open_parquet(store: ObjectStore, key: str, size: int, keys: KeyRing | None, *,
                 data: bytes | None = None, verify_pages: bool = False):
    """A ``pyarrow.parquet.ParquetFile`` over ``key`` (decrypting with ``keys``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if data is None and size <= WHOLE_READ_MAX:
        data = store.get(key)
    source = pa.BufferReader(data) if data is not None else store.fs.open_input_file(
        store.fs_path(key))
    props = keys.decryption_properties() if keys is not None else None
    return pq.ParquetFile(source, decryption_properties=props,
                          page_checksum_verification=verify_pages)


# ---- source stage -------------------------------------------------------------------------

def probe_files(ctx: SourceContext, files: list[str]) -> list[dict[str, Any]]:
    """sha256, rows, row groups and schema of each file; errors per file, not raised, so one
    run names every bad file."""
    check_site(ctx.site, ctx.data_class)
    out = []
    for key in files:
        try:
            h = hashlib.sha256()
            seen = 0
            for chunk in ctx.store.iter_chunks(key):
                h.update(chunk)
                seen += len(chunk)
            pf = open_parquet(ctx.store, key, seen, ctx.read_keys)
            md = pf.metadata
            groups = []
            for i in range(md.num_row_groups):
                rg = md.row_group(i)
                groups.append((rg.num_rows, sum(rg.column(c).total_compressed_size
                                                for c in range(rg.num_columns))))
            schema = pf.schema_arrow
            out.append({"file": key, "sha256": h.hexdigest(), "size": seen,
                        "rows": md.num_rows, "row_groups": groups, "schema_fp": schema_fp(schema),
                        "schema": schema_b64(schema)})
        except DataError as e:
            out.append({"file": key, "error": str(e)})
        except Exception as e:  # pyarrow: not Parquet, truncated, unreadable footer
            out.append({"file": key, "error": f"not a readable Parquet file: "
                                              f"{str(e).splitlines()[0][:300]}"})
    return out


def encode_part(ctx: SourceContext, spec: dict[str, Any]) -> dict[str, Any]:
    """Read one part's rows at the source, mask and encode them; return bytes + expectations.

    ``spec`` has ``file``, ``size``, ``source_sha256``, ``rows``, ``mode`` (``copy``: the file's
    own bytes; ``encode``: row groups ``[first, last)`` rewritten), ``path``.
    """

    from hybridray.storage import masking

    check_site(ctx.site, ctx.data_class)
    file = spec["file"]
    started = time.perf_counter()
    raw = ctx.store.get(file) if spec["size"] <= WHOLE_READ_MAX else None
    if spec["mode"] == "copy":
        # The file's own bytes, expected to hash to what the probe saw. Not re-hashed here:
        # the destination hashes what it stored and compares with exactly that, so a file
        # that changed since the probe fails the sync there.
        data, rows, fp, sha = raw, spec["rows"], spec["schema_fp"], spec["source_sha256"]
    elif raw is not None and hashlib.sha256(raw).hexdigest() != spec["source_sha256"]:
        raise DataError(f"{ctx.store.label}/{file} changed while the sync ran (its sha256 "
                        "differs from a moment ago); rerun the sync once it is stable")
    else:
        pf = open_parquet(ctx.store, file, spec["size"], ctx.read_keys, data=raw)
        sink = io.BytesIO()
        writer = None
        rows = 0
        first, last = spec["row_groups"]
        try:
            for i in range(first, last):
                table = pf.read_row_group(i)
                if ctx.masking is not None:
                    masked = masking.apply(table, ctx.masking, ctx.salt or b"")
                    masking.scan(table, masked, ctx.masking, f"{ctx.store.label}/{file}")
                    table = masked
                if schema_fp(table.schema) != ctx.schema_fp:
                    raise DataError(f"{ctx.store.label}/{file}: row group {i} has columns "
                                    f"{schema_fields(table.schema)}, unlike the rest of the "
                                    "dataset; rewrite the file with the dataset's schema")
                if writer is None:
                    writer = _writer(sink, table.schema, ctx)
                writer.write_table(table)
                rows += table.num_rows
            if writer is None:  # a file with no row groups still yields a (valid) part
                empty = pf.schema_arrow.empty_table()
                if ctx.masking is not None:
                    empty = masking.apply(empty, ctx.masking, b"\0" * 32)
                writer = _writer(sink, empty.schema, ctx)
        finally:
            if writer is not None:
                writer.close()
        data = sink.getvalue()
        fp, sha = ctx.schema_fp, hashlib.sha256(data).hexdigest()
        if rows != spec["rows"]:
            raise DataError(f"{ctx.store.label}/{file}: read {rows} rows from row groups "
                            f"{first}..{last - 1}, expected {spec['rows']}")
    del raw
    return {"path": spec["path"], "data": data, "sha256": sha,
            "bytes": len(data), "rows": rows, "schema_fp": fp, "source_site": ctx.site,
            "encode_s": time.perf_counter() - started}


def _writer(sink, schema, ctx: SourceContext):
    import pyarrow.parquet as pq

    props = ctx.write_keys.encryption_properties() if ctx.write_keys is not None else None
    return pq.ParquetWriter(sink, schema, compression=ctx.compression,
                            write_page_checksum=True, encryption_properties=props)


# ---- destination stage --------------------------------------------------------------------

def write_part(ctx: DestContext, part: dict[str, Any]) -> dict[str, Any]:
    """Write one part (atomically) and read it back: sha256, rows and schema must match."""
    site = check_site(ctx.site, ctx.data_class)
    started = time.perf_counter()
    data = part["data"]  # bytes, or a pyarrow.Buffer (anything with the buffer protocol)
    ctx.store.put(part["path"], data)
    back = ctx.store.get(part["path"])
    problems = check_bytes(back, part, ctx.keys)
    if problems:
        raise IntegrityError(f"{ctx.store.label}/{part['path']}: what was stored differs from "
                             "what the source site sent (damaged on the way, or the source file "
                             "changed during the sync); nothing committed, rerun the sync",
                             problems)
    count_bytes(ctx, len(data))
    return {"path": part["path"], "sha256": part["sha256"], "bytes": len(data),
            "rows": part["rows"], "site": site, "source_site": part["source_site"],
            "written": True, "write_s": time.perf_counter() - started}


def check_bytes(data: bytes, expect: dict[str, Any], keys: KeyRing | None, *,
                full: bool = False, parse: bool = True) -> list[str]:
    """Problems of one stored part against what the manifest says (empty: it is good).

    ``expect`` holds ``sha256`` (None: unknown, then every page is decoded and its CRC
    checked instead), ``rows`` and ``schema_fp``. ``parse=False`` compares sha256 and size
    only (where this process may not open the data).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    problems = []
    sha = hashlib.sha256(data).hexdigest()
    if expect.get("sha256") and sha != expect["sha256"]:
        problems.append(f"sha256 {sha[:12]}… differs from the manifest's "
                        f"{expect['sha256'][:12]}…")
    if expect.get("bytes") is not None and len(data) != expect["bytes"]:
        problems.append(f"{len(data)} bytes, the manifest says {expect['bytes']}")
    if not parse:
        if not expect.get("sha256"):
            problems.append("no sha256 in the manifest, and this process may not open the "
                            "part to check it: verify without --local, at the dataset's site")
        return problems
    try:
        props = keys.decryption_properties() if keys is not None else None
        pf = pq.ParquetFile(pa.BufferReader(data), decryption_properties=props,
                            page_checksum_verification=full or not expect.get("sha256"))
        if full or not expect.get("sha256"):
            pf.read()  # decodes every page, checking its CRC
        if pf.metadata.num_rows != expect["rows"]:
            problems.append(f"{pf.metadata.num_rows} rows, the manifest says {expect['rows']}")
        if expect.get("schema_fp") and schema_fp(pf.schema_arrow) != expect["schema_fp"]:
            problems.append(f"schema {schema_fields(pf.schema_arrow)} differs from the "
                            "manifest's")
    except DataError as e:
        problems.append(str(e))
    except Exception as e:
        problems.append(f"not readable as Parquet: {str(e).splitlines()[0][:200]}")
    return problems


def verify_parts(ctx: DestContext, parts: list[dict[str, Any]],
                 full: bool = False) -> list[dict[str, Any]]:
    """Re-read stored parts and check each; one result per part (``problems`` may be [])."""
    site = check_site(ctx.site, ctx.data_class)
    out = []
    for part in parts:
        try:
            data = ctx.store.get(part["path"])
        except DataError as e:
            out.append({"path": part["path"], "problems": [str(e)], "site": site})
            continue
        out.append({"path": part["path"], "problems": check_bytes(data, part, ctx.keys,
                                                                  full=full),
                    "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                    "site": site})
    return out


_COUNTERS: dict[str, Any] = {}


def count_bytes(ctx: DestContext, nbytes: int) -> None:
    """Bytes that crossed into ``ctx.site``, as a Ray metric (Prometheus on the dashboard)."""
    try:
        from ray.util.metrics import Counter

        counter = _COUNTERS.get("bytes")
        if counter is None:
            counter = _COUNTERS["bytes"] = Counter(
                "hybridray_data_transfer_bytes", description="Dataset bytes moved by "
                "hybridray sync, by source and destination site.",
                tag_keys=("cluster", "src_site", "dst_site"))
        counter.inc(nbytes, tags={"cluster": ctx.cluster, "src_site": ctx.src_site,
                                  "dst_site": ctx.site})
    except Exception:  # metrics are best effort; the audit log is the record
        pass


# ---- Ray Data stage functions (one part per batch) -----------------------------------------
#
# Ray Data re-raises a failed UDF as its own UserCodeException carrying only the text of the
# original, so the driver could not tell a MaskingError from a bug. A HybridRayError is
# therefore returned as a record (the pickled error) that flows to the driver, which stops the
# pipeline and raises it as itself.

def encode_batch(batch, ctx: SourceContext):
    """``map_batches`` at the source: specs in, encoded parts (bytes and all) out."""
    import json

    import pyarrow as pa

    data, meta = [], []
    for spec in batch.column("spec").to_pylist():
        try:
            row = encode_part(ctx, json.loads(spec))
        except HybridRayError as e:
            row = {"data": b"", "error": error_record(e)}
        data.append(row.pop("data"))
        meta.append(json.dumps(row))
    return pa.table({"data": _binary_column(data), "meta": pa.array(meta, pa.string())})


def _binary_column(blobs: list[bytes]):
    """A ``large_binary`` array over the blobs, copying them once (not once per step)."""
    import numpy as np
    import pyarrow as pa

    if len(blobs) == 1:  # the usual case: one part per batch, wrapped without a copy
        offsets = pa.py_buffer(np.array([0, len(blobs[0])], dtype=np.int64).tobytes())
        return pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1,
                                                [None, offsets, pa.py_buffer(blobs[0])])
    return pa.array(blobs, pa.large_binary())


def write_batch(batch, ctx: DestContext):
    """``map_batches`` at the destination: encoded parts in, small JSON records out."""
    import json

    import pyarrow as pa

    out = []
    blobs = batch.column("data").combine_chunks()
    for i, meta in enumerate(batch.column("meta").to_pylist()):
        part = json.loads(meta)
        if "error" not in part:
            part["data"] = _blob(blobs, i)  # a view into the block, not a copy
            try:
                part = write_part(ctx, part)
            except HybridRayError as e:
                part = {"error": error_record(e)}
        out.append(json.dumps(part))
    return pa.table({"record": pa.array(out, pa.string())})


def _blob(array, i: int):
    """Row ``i`` of a ``large_binary`` array as a zero-copy ``pyarrow.Buffer``."""
    import numpy as np

    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64, count=len(array) + 1,
                            offset=array.offset * 8)
    return array.buffers()[2][offsets[i]:offsets[i + 1]]


def error_record(e: HybridRayError) -> str:
    return base64.b64encode(pickle.dumps(e)).decode()


def raise_error_record(text: str):
    raise pickle.loads(base64.b64decode(text))
