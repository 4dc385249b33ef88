"""Deciding what a sync must move: the source's files, its class, and the parts to write.

Pure functions over listings and probe results, so the incremental rules are easy to test:

* A source file whose committed parts are still at the destination is **carried** (not
  moved) when its content is unchanged: same sha256 in a source manifest, or, for a plain
  directory, the same size and mtime as when it was last read (``checksum=True`` re-hashes
  every file instead). A file that was touched is re-hashed at the source and still carried
  if its sha256 did not change.
* Every other file is cut into **parts**: the file's own bytes when nothing transforms it
  (``copy``), else runs of row groups of about ``part_bytes`` re-encoded (``encode``). A part's
  key is derived from the source content, the row-group range and the transform, so the
  same input always names the same part, and a part left by an interrupted sync is found
  again by the next one.
* Files gone from the source drop out of the next version (deletions propagate).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from hybridray.exceptions import DataError
from hybridray.storage.fs import DatasetAddress
from hybridray.storage.manifest import CURRENT, FORMAT, Manifest, Part, SourceFile
from hybridray.storage.objects import ObjectStore
from hybridray.storage.parts import WHOLE_READ_MAX
from hybridray.topology.models import DataClass

DEFAULT_PART_BYTES = 64 << 20


@dataclass
class FileInfo:
    """One source file; ``sha256`` and the Parquet facts are filled by a probe (or carried)."""

    file: str
    size: int
    mtime_ns: int
    sha256: str | None = None
    rows: int | None = None
    row_groups: list[tuple[int, int]] | None = None   # (rows, compressed bytes) each
    schema_fp: str | None = None
    schema: str | None = None                          # base64 Arrow schema (probed files)


@dataclass
class Source:
    address: DatasetAddress
    store: ObjectStore
    files: dict[str, FileInfo]
    manifest: Manifest | None = None    # set when the source is a committed hybridray dataset


@dataclass
class PartPlan:
    """One part to write."""

    path: str
    file: str
    mode: str                            # copy | encode
    row_groups: tuple[int, int] | None
    rows: int
    info: FileInfo

    def spec(self) -> dict[str, Any]:
        """What ``parts.encode_part`` needs (JSON-able)."""
        return {"path": self.path, "file": self.file, "mode": self.mode, "size": self.info.size,
                "source_sha256": self.info.sha256, "rows": self.rows,
                "row_groups": list(self.row_groups) if self.row_groups else None,
                "schema_fp": self.info.schema_fp}

    def source_ref(self) -> SourceFile:
        return SourceFile(file=self.file, sha256=self.info.sha256 or "", size=self.info.size,
                          mtime_ns=self.info.mtime_ns, schema_fp=self.info.schema_fp or "",
                          row_groups=self.row_groups)


@dataclass
class Plan:
    carried: dict[str, list[Part]] = field(default_factory=dict)   # file -> committed parts
    to_probe: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


def discover(store: ObjectStore, address: DatasetAddress, uri: str,
             signing_key: bytes | None = None) -> Source:
    """The source's files: a committed hybridray dataset's parts, or a directory's files.

    Names starting with ``_`` or ``.`` are skipped in plain directories (``_SUCCESS``,
    checksum files), as Spark and pyarrow do.
    """
    if store.size(CURRENT) is not None:
        from hybridray.storage.manifest import DatasetStore

        manifest = DatasetStore(store, signing_key).manifest()  # verified: class is trusted
        files = {p.path: FileInfo(p.path, p.bytes, 0, p.sha256, p.rows,
                                  schema_fp=manifest.schema_.fingerprint)
                 for p in manifest.parts}
        return Source(address, store, files, manifest)
    listing = store.list_stat()
    files = {k: FileInfo(k, size, mtime) for k, (size, mtime) in sorted(listing.items())
             if not any(part.startswith(("_", ".")) for part in k.split("/"))}
    if not files:
        if listing or store.exists():
            raise DataError(f"{address} ({uri}) holds no data files (names starting with _ "
                            "or . are skipped); point it at a directory of Parquet files")
        raise DataError(f"{address} does not exist ({uri}); check the path, or list what is "
                        f"there with: hybridray ls {address.site}:"
                        f"{address.path.rsplit('/', 1)[0] if '/' in address.path else ''}")
    return Source(address, store, files)


def resolve_class(source: Source, declared: DataClass | str | None,
                  default: DataClass = DataClass.restricted) -> tuple[DataClass, str]:
    """The source's data class and where it came from (manifest, declared, or default).

    A class recorded in a manifest can only be raised by a declaration, never lowered: only
    masking lowers a class. With neither, the data is treated as ``restricted`` (deny by
    default).
    """
    recorded = source.manifest.data_class if source.manifest else None
    if declared is not None:
        declared = DataClass(declared)
        if recorded is not None and declared < recorded:
            raise DataError(f"{source.address} is recorded as {recorded.value} in its manifest;"
                            f" declaring it {declared.value} would lower it without masking. "
                            "Mask it (--mask) to lower its class")
        return max(declared, recorded or declared), "declared"
    if recorded is not None:
        return recorded, "manifest"
    return DataClass(default), "default"


def transform_fp(masking_fp: str | None, footer_key: str | None, compression: str) -> str:
    body = f"{FORMAT}|mask={masking_fp or '-'}|enc={footer_key or '-'}|codec={compression}"
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def carry(source: Source, prev: Manifest | None, transform: str, stored: dict[str, int],
          *, checksum: bool) -> Plan:
    """Which files keep their committed parts, which must be probed, which were deleted."""
    plan = Plan()
    prev_by_file = _by_file(prev, transform)
    for name, info in source.files.items():
        parts = prev_by_file.get(name)
        if parts and _intact(parts, stored):
            ref = parts[0].source
            if source.manifest is not None:
                same = info.sha256 == ref.sha256
            else:
                same = not checksum and info.size == ref.size and info.mtime_ns == ref.mtime_ns
            if same:
                info.sha256, info.schema_fp = ref.sha256, ref.schema_fp
                info.rows = sum(p.rows for p in parts)
                plan.carried[name] = parts
                continue
        plan.to_probe.append(name)
    if prev is not None:
        plan.deleted = sorted({p.source.file for p in prev.parts} - set(source.files))
    return plan


def carry_probed(plan: Plan, source: Source, prev: Manifest | None, transform: str,
                 stored: dict[str, int]) -> list[str]:
    """After probing: files whose content did not change after all join ``carried``
    (recording their new size/mtime); returns the files that really changed."""
    prev_by_file = _by_file(prev, transform)
    changed = []
    for name in plan.to_probe:
        info = source.files[name]
        parts = prev_by_file.get(name)
        if parts and _intact(parts, stored) and parts[0].source.sha256 == info.sha256:
            seen = {"size": info.size, "mtime_ns": info.mtime_ns}
            plan.carried[name] = [p.model_copy(update={"source": p.source.model_copy(
                update=seen)}) for p in parts]
        else:
            changed.append(name)
    return changed


def plan_parts(info: FileInfo, transform: str, *, copy_ok: bool,
               part_bytes: int = DEFAULT_PART_BYTES) -> list[PartPlan]:
    """Cut one probed file into parts."""
    assert info.sha256 and info.rows is not None and info.row_groups is not None
    if copy_ok and info.size <= WHOLE_READ_MAX:
        return [PartPlan(_part_path(transform, info.sha256, "copy", None), info.file, "copy",
                         None, info.rows, info)]
    out, start, acc, rows = [], 0, 0, 0
    groups = info.row_groups
    for i, (n, nbytes) in enumerate(groups):
        acc += nbytes
        rows += n
        if acc >= part_bytes or i == len(groups) - 1:
            rg = (start, i + 1)
            out.append(PartPlan(_part_path(transform, info.sha256, "encode", rg), info.file,
                                "encode", rg, rows, info))
            start, acc, rows = i + 1, 0, 0
    if not out:  # no row groups: one empty part keeps the file's schema in the dataset
        out.append(PartPlan(_part_path(transform, info.sha256, "encode", (0, 0)), info.file,
                            "encode", (0, 0), 0, info))
    return out


def check_schemas(source: Source) -> str:
    """Every file must have the same columns; returns the common schema fingerprint."""
    groups: dict[str, list[str]] = {}
    for name, info in source.files.items():
        groups.setdefault(info.schema_fp or "?", []).append(name)
    if len(groups) <= 1:
        return next(iter(groups), "")
    ranked = sorted(groups.values(), key=len, reverse=True)
    lines = [f"{_few(files)} ({len(files)} file{'s' if len(files) > 1 else ''})"
             for files in ranked]
    raise DataError(f"{source.address}: files disagree on their columns, so they are not one "
                    "dataset: " + "; versus ".join(lines) + ". Rewrite the odd files with the "
                    "common schema, or move them to a dataset of their own")


def _few(files: list[str], n: int = 3) -> str:
    shown = ", ".join(files[:n])
    return shown + (f" and {len(files) - n} more" if len(files) > n else "")


def _by_file(prev: Manifest | None, transform: str) -> dict[str, list[Part]]:
    if prev is None or prev.transform != transform:
        return {}
    out: dict[str, list[Part]] = {}
    for p in prev.parts:
        out.setdefault(p.source.file, []).append(p)
    return out


def _intact(parts: list[Part], stored: dict[str, int]) -> bool:
    return all(stored.get(p.path) == p.bytes for p in parts)


def _part_path(transform: str, sha: str, mode: str, rg: tuple[int, int] | None) -> str:
    span = "all" if rg is None else f"{rg[0]}-{rg[1]}"
    key = hashlib.sha256(f"{transform}|{sha}|{mode}|{span}".encode()).hexdigest()[:32]
    return f"_parts/{key}.parquet"
