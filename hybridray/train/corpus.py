"""The training corpus: text files turned into byte-token shards with Ray Data, at the data's site.

Every stage that touches the text (listing the files, reading and tokenizing them, writing the
shards, hashing what was written) runs as Ray work placed by the placement compiler at the
site that holds the data, which must be allowed to hold its class; the driver only sees file
names, sizes and hashes. By default the corpus is the Python standard library's own source
(every machine with Python has it), treated as the company's proprietary code: ``restricted``.

Layout under ``data.output`` (``SITE:PATH`` in site storage)::

    PATH/manifest.json                    the commit point: written last, lists every shard
    PATH/shards-<fingerprint>-<id>/*.parquet   one row per source file:
                                          split ("train"/"val"), path, n_tokens, tokens
                                          (uint16 little-endian bytes, document + EOT)

Ray Data writes are at-least-once, so shards go to a fresh directory and only the manifest,
written atomically after the shards are hashed at the site, makes them visible. A manifest
whose fingerprint (file names, sizes, mtimes and prep options) matches the source is reused.
"""

from __future__ import annotations

import datetime
import fnmatch
import hashlib
import io
import json
import math
import os
import sysconfig
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from hybridray.exceptions import PlacementRefused, TrainError
from hybridray.storage.fs import DatasetAddress, parse_address, site_filesystem
from hybridray.topology.models import DataClass, Topology

MANIFEST = "manifest.json"
FORMAT = 1
TOKEN_DTYPE = np.dtype("<u2")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class CorpusManifest:
    """A prepared corpus: where it lives, its class, and its shards (``data``: the JSON)."""

    address: DatasetAddress
    data: dict[str, Any]

    @property
    def data_class(self) -> DataClass:
        return DataClass(self.data["data_class"])

    @property
    def site(self) -> str:
        return self.address.site

    def tokens(self, split: str) -> int:
        return int(self.data["splits"][split]["tokens"])

    def to_json(self) -> dict[str, Any]:
        return {"address": str(self.address), **self.data}


def source_spec(source: str, topology: Topology) -> dict[str, str]:
    """``{"kind": "stdlib"|"dir"|"site"|"dataset", "root": ..., "site": ...}`` for
    ``data.source``."""
    if source.startswith("dataset:"):
        addr = parse_address(source.removeprefix("dataset:"), topology)
        return {"kind": "dataset", "site": addr.site, "root": addr.path}
    if source == "stdlib":
        return {"kind": "stdlib", "root": sysconfig.get_paths()["stdlib"]}
    if source.startswith("/"):
        return {"kind": "dir", "root": os.path.normpath(source)}
    if ":" in source and "://" not in source:
        addr = parse_address(source, topology)
        return {"kind": "site", "site": addr.site, "root": addr.path}
    raise TrainError(f"data.source {source!r}: use stdlib, an absolute directory on the data "
                     "site's nodes, SITE:PATH of text files in site storage, or "
                     "dataset:SITE:PATH of a dataset written by hybridray sync")


# ---- driver side --------------------------------------------------------------------------

def prepare_corpus(data: Any, topology: Topology, *, cluster: Any = None, name: str = "train",
                   progress: bool = False, queue: bool = False) -> CorpusManifest:
    """Prepare (or reuse) the token shards described by ``data`` (a ``DataSection``).

    Placement: a ``data`` workload of ``data.data_class`` pinned to the output site (audited
    through ``cluster.place`` when a ``Cluster`` is given); ``queue`` waits for CPUs held
    there instead of being refused. Ray must be initialised.

    Raises:
        PlacementRefused: the output site may not hold the data's class.
        TrainError: the source is missing or empty, or ``prepare: never`` and nothing is
            prepared.
    """
    import ray

    from hybridray.placement import compile as C
    from hybridray.placement.policy import decide
    from hybridray.placement.workload import Workload, WorkloadKind

    out = parse_address(data.output, topology)
    cls = DataClass(data.data_class or topology.default_data_class)
    site = topology.sites[out.site]
    if not site.may_hold(cls):
        refusal = PlacementRefused(
            f"data.output {data.output}: site {out.site!r} may hold up to "
            f"{site.max_data_class.value}, not {cls.value} data",
            rule="residency", fix="write the shards to a site allowed for "
            f"{cls.value}: {', '.join(topology.sites_by_class[cls]) or 'none'}")
        if cluster is not None:
            cluster.audit.refusal(refusal, what="train output", workload=name, site=out.site,
                                  data_class=cls.value, cluster=topology.name)
        raise refusal
    src = source_spec(data.source, topology)
    if src["kind"] in ("site", "dataset") and src["site"] != out.site:
        raise TrainError(f"data.source {data.source}: prepare text at the site that will hold "
                         f"the shards ({out.site}); sync it there first")
    fs, base = out.resolve(topology)
    existing = _read_manifest(fs, base)
    if existing is not None and DataClass(existing.get("data_class", "restricted")) > cls:
        raise TrainError(
            f"{out.uri(topology)}/{MANIFEST}: this corpus is {existing.get('data_class')}; "
            f"the config says {cls.value}, and a class is never lowered by relabelling. Set "
            f"data.data_class={existing.get('data_class')}, or write the lower class to "
            "another data.output after masking it")
    if data.prepare == "never":
        if existing is None:
            raise TrainError(f"{out.uri(topology)}/{MANIFEST}: no prepared corpus; run with "
                             "data.prepare=auto to build it")
        return _checked(CorpusManifest(out, existing), cls, out, topology)

    wl = Workload(name=f"{name}-corpus", kind=WorkloadKind.data, cpus=1, data_classes=(cls,),
                  site=out.site, burst=False, data_site=out.site, queue=queue)
    placement = cluster.place(wl) if cluster is not None else decide(topology, wl)
    placement.raise_if_refused()
    opts = C.data_remote_args(placement)
    topo_json = topology.model_dump(mode="json")
    if src["kind"] == "dataset":
        return _prepare_from_dataset(data, src, out, cls, existing, topology, cluster, opts,
                                     progress)

    files = ray.get(ray.remote(_list_files).options(**opts).remote(
        src, list(data.include), cls.value, topo_json))
    if not files:
        raise TrainError(f"data.source {data.source}: no files matching "
                         f"{', '.join(data.include)} under {src['root']}")
    if data.max_files:
        files = files[:data.max_files]
    if len(files) < 2:
        raise TrainError(f"data.source {data.source}: found {len(files)} file; a corpus needs "
                         "at least two (one held out for evaluation)")
    options = {"include": list(data.include), "val_fraction": data.val_fraction,
               "max_files": data.max_files, "shard_files": data.shard_files,
               "tokenizer": "bytes", "format": FORMAT}
    fingerprint = hashlib.sha256(json.dumps([src, options, files], sort_keys=True)
                                 .encode()).hexdigest()
    if existing is not None and data.prepare == "auto" and \
            existing.get("fingerprint") == fingerprint and existing.get("data_class") == cls.value:
        return CorpusManifest(out, existing)

    rows = _assign_splits(files, data.val_fraction)
    shard_dir = f"shards-{fingerprint[:12]}-{uuid.uuid4().hex[:8]}"
    _write_shards(rows, src, f"{base}/{shard_dir}", fs, cls, topo_json, opts,
                  data.shard_files, progress)
    shards = ray.get(ray.remote(_hash_shards).options(**opts).remote(
        out.site, f"{base}/{shard_dir}", cls.value, topo_json))
    if not shards:
        raise TrainError(f"{out.uri(topology)}/{shard_dir}: Ray Data wrote no shards")
    manifest = {
        "format": FORMAT, "kind": "hybridray.token-shards", "tokenizer": "bytes",
        "eot": 256, "dtype": "uint16", "data_class": cls.value, "site": out.site,
        "source": data.source, "source_root": src["root"], "fingerprint": fingerprint,
        "options": options, "created_at": datetime.datetime.now(datetime.timezone.utc)
        .isoformat(timespec="seconds"),
        "prepared_at_sites": sorted({s["site"] for s in shards}),
        "splits": {split: {"files": sum(1 for r in rows if r["split"] == split),
                           "tokens": sum(s["tokens"][split] for s in shards)}
                   for split in ("train", "val")},
        "shards": [{k: v for k, v in s.items() if k != "site"} | {"path": f"{shard_dir}/"
                   + s["path"]} for s in shards],
    }
    _commit_manifest(fs, base, manifest)
    return CorpusManifest(out, manifest)


def _prepare_from_dataset(data: Any, src: dict[str, str], out: DatasetAddress, cls: DataClass,
                          existing: dict[str, Any] | None, topology: Topology, cluster: Any,
                          opts: dict[str, Any], progress: bool) -> CorpusManifest:
    """Token shards from the committed version of a hybridray dataset, one document per row.

    Only what the dataset's manifest commits is read (never staged parts of a sync in
    flight); its class is the floor of the corpus's class; rows are read and tokenized by Ray
    Data at the site, and a row goes to evaluation by a hash of its text.
    """
    import ray

    from hybridray.storage.readers import open_dataset

    fs, base = out.resolve(topology)
    address = data.source.removeprefix("dataset:")
    ds = open_dataset(address, cluster=cluster, topology=None if cluster else topology)
    if ds.manifest.data_class > cls:
        raise TrainError(f"data.source {data.source}: the dataset is {ds.data_class}, above "
                         f"data.data_class={cls.value}; set data.data_class={ds.data_class} "
                         "(a class is never lowered by relabelling)")
    names = ds.schema.names
    if data.text_column not in names:
        raise TrainError(f"data.source {data.source}: no column {data.text_column!r}; set "
                         f"data.text_column to one of {', '.join(names)}")
    if ds.rows < 2:
        raise TrainError(f"data.source {data.source}: {ds.rows} row; a corpus needs at least "
                         "two (one held out for evaluation)")
    options = {"text_column": data.text_column, "val_fraction": data.val_fraction,
               "shard_files": data.shard_files, "tokenizer": "bytes", "format": FORMAT}
    parts = [p.sha256 for p in ds.manifest.parts]
    fingerprint = hashlib.sha256(json.dumps([src, options, parts], sort_keys=True)
                                 .encode()).hexdigest()
    if existing is not None and data.prepare == "auto" and \
            existing.get("fingerprint") == fingerprint and existing.get("data_class") == cls.value:
        return CorpusManifest(out, existing)

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = progress
    remote = {k: v for k, v in opts.items() if k not in ("num_cpus", "num_gpus")}
    shard_dir = f"shards-{fingerprint[:12]}-{uuid.uuid4().hex[:8]}"
    rows = ds.to_ray(**opts).map_batches(
        _tokenize_rows, fn_kwargs={"column": data.text_column, "data_class": cls.value,
                                   "val_fraction": data.val_fraction},
        batch_size=data.shard_files, batch_format="pyarrow",
        num_cpus=opts.get("num_cpus", 1), **remote)
    rows.write_parquet(f"{base}/{shard_dir}", filesystem=fs, ray_remote_args=opts,
                       min_rows_per_file=data.shard_files, compression="zstd")
    shards = ray.get(ray.remote(_hash_shards).options(**opts).remote(
        out.site, f"{base}/{shard_dir}", cls.value, topology.model_dump(mode="json")))
    splits = {split: {"files": sum(s["rows"] for s in shards),
                      "tokens": sum(s["tokens"][split] for s in shards)}
              for split in ("train", "val")}
    for split in ("train", "val"):
        if not splits[split]["tokens"]:
            raise TrainError(f"data.source {data.source}: no rows fell in the {split} split "
                             f"of {ds.rows}; adjust data.val_fraction")
    manifest = {
        "format": FORMAT, "kind": "hybridray.token-shards", "tokenizer": "bytes",
        "eot": 256, "dtype": "uint16", "data_class": cls.value, "site": out.site,
        "source": data.source, "source_root": src["root"], "fingerprint": fingerprint,
        "source_version": ds.version, "options": options,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "prepared_at_sites": sorted({s["site"] for s in shards}),
        "splits": splits,
        "shards": [{k: v for k, v in s.items() if k != "site"} | {"path": f"{shard_dir}/"
                   + s["path"]} for s in shards],
    }
    _commit_manifest(fs, base, manifest)
    return CorpusManifest(out, manifest)


def _checked(manifest: CorpusManifest, cls: DataClass, out: DatasetAddress,
             topology: Topology) -> CorpusManifest:
    have = manifest.data.get("data_class")
    if have is None or DataClass(have) != cls:
        raise TrainError(f"{out.uri(topology)}/{MANIFEST}: corpus is class {have}, the config "
                         f"says {cls.value}; fix data.data_class or rebuild with "
                         "data.prepare=always")
    return manifest


def _assign_splits(files: list[dict[str, Any]], val_fraction: float) -> list[dict[str, Any]]:
    """Hold out whole files for evaluation by a hash of their path (stable as files change),
    at least one file in each split."""
    def score(path: str) -> float:
        return int(hashlib.sha256(path.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    rows = [{**f, "split": "val" if score(f["path"]) < val_fraction else "train"} for f in files]
    if not any(r["split"] == "val" for r in rows):
        min(rows, key=lambda r: score(r["path"]))["split"] = "val"
    if not any(r["split"] == "train" for r in rows):
        max(rows, key=lambda r: score(r["path"]))["split"] = "train"
    return rows


def _write_shards(rows: list[dict[str, Any]], src: dict[str, str], dest: str, fs: Any,
                  cls: DataClass, topo_json: dict, opts: dict[str, Any], shard_files: int,
                  progress: bool) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    remote = {k: v for k, v in opts.items() if k not in ("num_cpus", "num_gpus")}
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / shard_files)))
    ds = ds.map_batches(_tokenize, fn_kwargs={"src": src, "data_class": cls.value,
                                              "topology": topo_json},
                        batch_size=shard_files, batch_format="pyarrow",
                        num_cpus=opts.get("num_cpus", 1), **remote)
    ds.write_parquet(dest, filesystem=fs, ray_remote_args=opts, min_rows_per_file=shard_files,
                     compression="zstd")


def _read_manifest(fs: Any, base: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_stream(f"{base}/{MANIFEST}") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrainError(f"{base}/{MANIFEST}: unreadable corpus manifest ({e}); rebuild with "
                         "data.prepare=always") from None


def _commit_manifest(fs: Any, base: str, manifest: dict[str, Any]) -> None:
    tmp = f"{base}/.{MANIFEST}.{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(manifest, indent=2).encode())
    fs.move(tmp, f"{base}/{MANIFEST}")


def read_manifest(address: str | DatasetAddress, topology: Topology) -> CorpusManifest:
    """The committed manifest at ``SITE:PATH``; ``TrainError`` if there is none."""
    addr = parse_address(address, topology) if isinstance(address, str) else address
    fs, base = addr.resolve(topology)
    data = _read_manifest(fs, base)
    if data is None:
        raise TrainError(f"{addr.uri(topology)}/{MANIFEST}: no prepared corpus here")
    return CorpusManifest(addr, data)


# ---- at the data's site (Ray tasks and Ray Data stages) -----------------------------------

def _open_source(src: dict[str, str], topo_json: dict):
    """(filesystem, root) to read ``src`` on this node."""
    import pyarrow.fs as pafs

    if src["kind"] == "site":
        topology = Topology.model_validate(topo_json)
        fs, base = site_filesystem(topology.sites[src["site"]])
        return fs, f"{base}/{src['root']}" if base else src["root"]
    return pafs.LocalFileSystem(), src["root"]


def _list_files(src: dict[str, str], include: list[str], data_class: str,
                topo_json: dict) -> list[dict[str, Any]]:
    import pyarrow.fs as pafs

    from hybridray.placement.guard import check_residency

    check_residency(data_class)
    fs, root = _open_source(src, topo_json)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise TrainError(f"data.source {root}: not a directory on this site's nodes")
    out = []
    for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if f.type != pafs.FileType.File:
            continue
        rel = f.path[len(root):].lstrip("/")
        parts = rel.split("/")
        if _SKIP_DIRS.intersection(parts[:-1]) and src["kind"] == "stdlib":
            continue
        if any(fnmatch.fnmatch(parts[-1], pat) for pat in include):
            out.append({"path": rel, "size": f.size,
                        "mtime": f.mtime.timestamp() if f.mtime else None})
    return sorted(out, key=lambda r: r["path"])


def _tokenize(batch, src: dict[str, str], data_class: str, topology: dict):
    """Ray Data stage: read each source file at the site and turn it into byte tokens."""
    import pyarrow as pa

    from hybridray.placement.guard import check_residency

    site = check_residency(data_class)
    fs, root = _open_source(src, topology)
    paths = batch.column("path").to_pylist()
    tokens, counts = [], []
    for rel in paths:
        with fs.open_input_stream(f"{root}/{rel}") as f:
            raw = f.read()
        arr = np.empty(len(raw) + 1, dtype=TOKEN_DTYPE)
        arr[:-1] = np.frombuffer(raw, dtype=np.uint8)
        arr[-1] = 256   # EOT ends every document
        tokens.append(arr.tobytes())
        counts.append(len(arr))
    return pa.table({"split": batch.column("split"), "path": paths,
                     "n_tokens": pa.array(counts, pa.int64()),
                     "tokens": pa.array(tokens, pa.large_binary()),
                     "site": [site] * len(paths)})


def _tokenize_rows(batch, column: str, data_class: str, val_fraction: float):
    """Ray Data stage: each row's text becomes one document of byte tokens."""
    import pyarrow as pa

    from hybridray.placement.guard import check_residency

    site = check_residency(data_class)
    texts = batch.column(column).to_pylist()
    splits, paths, tokens, counts = [], [], [], []
    for text in texts:
        raw = text if isinstance(text, bytes) else str(text or "").encode()
        digest = hashlib.sha256(raw).hexdigest()
        splits.append("val" if int(digest[:8], 16) / 0xFFFFFFFF < val_fraction else "train")
        paths.append(f"row-{digest[:12]}")
        arr = np.empty(len(raw) + 1, dtype=TOKEN_DTYPE)
        arr[:-1] = np.frombuffer(raw, dtype=np.uint8)
        arr[-1] = 256
        tokens.append(arr.tobytes())
        counts.append(len(arr))
    return pa.table({"split": splits, "path": paths, "n_tokens": pa.array(counts, pa.int64()),
                     "tokens": pa.array(tokens, pa.large_binary()),
                     "site": [site] * len(texts)})


def _hash_shards(site_name: str, directory: str, data_class: str,
                 topo_json: dict) -> list[dict[str, Any]]:
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from hybridray.placement.guard import check_residency

    here = check_residency(data_class)
    topology = Topology.model_validate(topo_json)
    fs, _ = site_filesystem(topology.sites[site_name])
    out = []
    for f in fs.get_file_info(pafs.FileSelector(directory, recursive=False)):
        if f.type != pafs.FileType.File or not f.path.endswith(".parquet"):
            continue
        with fs.open_input_stream(f.path) as s:
            raw = s.read()
        table = pq.read_table(io.BytesIO(raw), columns=["split", "n_tokens", "site"])
        per_split = {"train": 0, "val": 0}
        for split, n in zip(table.column("split").to_pylist(),
                            table.column("n_tokens").to_pylist(), strict=True):
            per_split[split] += n
        written_at = set(table.column("site").to_pylist())
        out.append({"path": f.path.rsplit("/", 1)[-1], "bytes": len(raw),
                    "sha256": hashlib.sha256(raw).hexdigest(), "rows": table.num_rows,
                    "tokens": per_split, "site": here, "tokenized_at": sorted(written_at)})
    return sorted(out, key=lambda s: s["path"])


def load_tokens(manifest: dict[str, Any], address: str, topology: Topology,
                splits: tuple[str, ...] = ("train", "val")) -> tuple[dict[str, np.ndarray], int]:
    """Read a corpus's shards at this node: ``({split: uint16 tokens}, bytes read)``.

    Each shard's sha256 is checked against the manifest before use.

    Raises:
        TrainError: a shard is missing or does not match its hash (the message names it).
    """
    import pyarrow.parquet as pq

    addr = parse_address(address, topology)
    fs, base = addr.resolve(topology)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in splits}
    nbytes = 0
    for shard in manifest["shards"]:
        where = f"{addr.uri(topology)}/{shard['path']}"
        try:
            with fs.open_input_stream(f"{base}/{shard['path']}") as f:
                raw = f.read()
        except FileNotFoundError:
            raise TrainError(f"{where}: shard listed in {MANIFEST} is missing; rebuild with "
                             "data.prepare=always") from None
        nbytes += len(raw)
        if hashlib.sha256(raw).hexdigest() != shard["sha256"]:
            raise TrainError(f"{where}: sha256 does not match {MANIFEST} (corrupt or "
                             "changed shard); rebuild with data.prepare=always")
        table = pq.read_table(io.BytesIO(raw), columns=["split", "tokens"])
        for split, blob in zip(table.column("split").to_pylist(),
                               table.column("tokens").to_pylist(), strict=True):
            if split in parts:
                parts[split].append(np.frombuffer(blob, dtype=TOKEN_DTYPE))
    tokens = {s: np.concatenate(v) if v else np.empty(0, TOKEN_DTYPE) for s, v in parts.items()}
    return tokens, nbytes
