"""A dataset's committed versions: the manifest, the ``_CURRENT`` pointer, and the lease.

Layout of a dataset at a site (``site:path``)::

    PATH/_CURRENT                   {"version": 6, "manifest": "_manifests/v000006.json",
                                     "manifest_sha256": …}          written last: the commit
    PATH/_manifests/v000006.json    every part of version 6: sha256, bytes, rows, source file
    PATH/_parts/<key>.parquet       parts; a key is derived from the source file's content and
                                    the transform, so an unchanged file keeps its part
    PATH/_LOCK                      lease held by the one sync writing here

A part is written (atomically: one object, or a temp file renamed) and verified by reading it
back *before* any manifest names it: until then it is staged, invisible to every hybridray
reader, and a crash leaves it behind harmlessly (the next sync adopts it after verifying it,
or deletes it). A version is committed by writing its manifest and then ``_CURRENT``, each a
single atomic object write, so a reader sees the old version or the new one, never a mix.
Nothing is renamed at commit, which is what makes the protocol work on object stores, where a
rename is a copy. Names starting with ``_`` also keep naive readers (``read_parquet(PATH)``
discovery skips them) from picking up staged or superseded parts.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import socket
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hybridray.exceptions import DataError
from hybridray.procs import process_start_time
from hybridray.storage.objects import ObjectStore
from hybridray.topology.models import DataClass

FORMAT = "hybridray.dataset/1"
CURRENT = "_CURRENT"
MANIFESTS = "_manifests"
PARTS = "_parts"
LOCK = "_LOCK"
LEASE_S = 600.0   # renewed every LEASE_S / 5 while the sync runs


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class SourceFile(_Model):
    """The source file a part came from, as it was when it was read."""

    file: str = Field(description="Path relative to the source dataset.")
    sha256: str
    size: int
    mtime_ns: int = 0
    schema_fp: str = ""
    row_groups: tuple[int, int] | None = Field(
        None, description="[first, last) row groups of the file in this part; None: all.")


class Part(_Model):
    """One Parquet object of a version."""

    path: str = Field(description="Relative to the dataset, e.g. _parts/ab12….parquet.")
    sha256: str
    bytes: int
    rows: int
    source: SourceFile


class SchemaInfo(_Model):
    fingerprint: str
    fields: list[tuple[str, str]]
    arrow: str = Field(description="The Arrow schema, IPC-serialised and base64-encoded.")


class Manifest(_Model):
    """Everything a reader needs to read one version, and a verifier to check it."""

    format: str = FORMAT
    dataset_id: str
    version: int = Field(ge=1)
    parent: int | None = None
    committed_at: str
    data_class: DataClass
    source: dict[str, Any] = Field(default_factory=dict)
    masking: dict[str, Any] | None = None
    encryption: dict[str, Any] | None = None
    transform: str = Field("", description="Fingerprint of masking, encryption and encoding; "
                                           "parts are reused only while it is unchanged.")
    schema_: SchemaInfo = Field(alias="schema")
    rows: int
    bytes: int
    parts: list[Part]
    signature: str | None = Field(None, description="HMAC-SHA256 of every other field with "
                                                    "the cluster's signing key.")

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=1,
                          sort_keys=True)

    def signed(self, key: bytes) -> Manifest:
        return self.model_copy(update={"signature": sign(key, self._body())})

    def verify(self, key: bytes, where: str) -> None:
        """Raise ``IntegrityError`` unless the signature is this cluster's, over these fields."""
        from hybridray.exceptions import IntegrityError

        if not self.signature:
            raise IntegrityError(f"{where}: the manifest is not signed; hybridray signs every "
                                 "manifest it commits, so this one was written by hand or by "
                                 "an older hybridray: rewrite it with hybridray sync "
                                 "--overwrite from its source")
        if not hmac.compare_digest(self.signature, sign(key, self._body())):
            raise IntegrityError(f"{where}: the manifest's signature does not match its "
                                 "content (edited after commit, e.g. its data_class) or was "
                                 "signed by another cluster's key; refusing to read it. "
                                 "Rewrite it with hybridray sync --overwrite from its source")

    def _body(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude={"signature"})


def sign(key: bytes, body: Any) -> str:
    """HMAC-SHA256 (hex) of ``body`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


class Current(_Model):
    format: str = FORMAT
    dataset_id: str
    version: int
    manifest: str
    manifest_sha256: str
    committed_at: str


def manifest_key(version: int) -> str:
    return f"{MANIFESTS}/v{version:06d}.json"


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class DatasetStore:
    """The versions of one dataset in an ``ObjectStore`` rooted at the dataset."""

    def __init__(self, store: ObjectStore, signing_key: bytes | None = None):
        """``signing_key``: the cluster's HMAC key. With it, commits are signed and every
        manifest read is verified (a hand-edited or unsigned one is refused)."""
        self.store = store
        self.signing_key = signing_key

    @property
    def label(self) -> str:
        return self.store.label

    # -- reading ------------------------------------------------------------------------------
    def current(self) -> Current | None:
        """The committed pointer, or None when nothing was ever committed here."""
        text = self.store.get_text(CURRENT)
        if text is None:
            return None
        try:
            cur = Current.model_validate_json(text)
        except ValidationError as e:
            raise DataError(f"{self.label}/{CURRENT} is unreadable ({e.error_count()} "
                            "problems); the dataset cannot be read until it is rewritten "
                            "with hybridray sync --overwrite") from None
        if cur.format != FORMAT:
            raise DataError(f"{self.label}: format {cur.format!r}, this hybridray reads "
                            f"{FORMAT!r}; upgrade hybridray")
        return cur

    def manifest(self, version: int | None = None) -> Manifest:
        """The manifest of ``version`` (default: the committed one), checked against the
        sha256 that ``_CURRENT`` recorded for it."""
        cur = self.current()
        if cur is None:
            raise DataError(f"{self.label}: no committed version (nothing synced here yet, "
                            "or every sync so far was interrupted)")
        key = cur.manifest if version in (None, cur.version) else manifest_key(version)
        data = self.store.get(key) if self.store.size(key) is not None else None
        if data is None:
            kept = ", ".join(str(v) for v in self.versions()) or "none"
            raise DataError(f"{self.label}: no version {version} (versions kept: {kept})")
        if key == cur.manifest and hashlib.sha256(data).hexdigest() != cur.manifest_sha256:
            raise DataError(f"{self.label}/{key}: sha256 differs from the one {CURRENT} "
                            "recorded; the manifest was modified after commit")
        try:
            manifest = Manifest.model_validate_json(data)
        except ValidationError as e:
            raise DataError(f"{self.label}/{key}: unreadable manifest: {e}") from None
        if self.signing_key is not None:
            manifest.verify(self.signing_key, f"{self.label}/{key}")
        return manifest

    def versions(self) -> list[int]:
        """Committed versions whose manifests are kept, oldest first."""
        cur = self.current()
        if cur is None:
            return []
        out = []
        for key in self.store.list(MANIFESTS):
            name = key.rsplit("/", 1)[-1]
            if name.startswith("v") and name.endswith(".json") and name[1:-5].isdigit():
                v = int(name[1:-5])
                if v <= cur.version:  # a higher one is a commit that never finished
                    out.append(v)
        return sorted(out)

    def parts(self) -> dict[str, int]:
        """Every object under ``_parts/`` (committed or staged) with its size."""
        return self.store.list(PARTS)

    def foreign(self) -> list[str]:
        """Objects here that hybridray did not write (another tool's dataset)."""
        return sorted(k for k in self.store.list()
                      if not k.startswith((PARTS + "/", MANIFESTS + "/", CURRENT, LOCK)))

    # -- committing ---------------------------------------------------------------------------
    def commit(self, manifest: Manifest, *, expect: Current | None) -> Current:
        """Write ``manifest`` and then ``_CURRENT``: the version becomes visible atomically.

        Raises ``DataError`` if another writer committed since ``expect`` was read.
        """
        now = self.current()
        if (now.version if now else None) != (expect.version if expect else None):
            raise DataError(f"{self.label}: version {now.version if now else None} was "
                            "committed by another sync while this one ran; rerun the sync")
        if self.signing_key is not None:
            manifest = manifest.signed(self.signing_key)
        body = manifest.to_json().encode()
        key = manifest_key(manifest.version)
        self.store.put(key, body)
        cur = Current(dataset_id=manifest.dataset_id, version=manifest.version, manifest=key,
                      manifest_sha256=hashlib.sha256(body).hexdigest(),
                      committed_at=manifest.committed_at)
        self.store.put_text(CURRENT, cur.model_dump_json(indent=1))
        return cur

    def collect_garbage(self, keep: int) -> tuple[int, int]:
        """Delete manifests beyond the newest ``keep`` versions and every part that no kept
        manifest names (staged leftovers included). Returns (manifests, parts) deleted."""
        cur = self.current()
        if cur is None:
            return 0, 0
        versions = self.versions()
        kept = versions[-max(keep, 1):]
        referenced: set[str] = set()
        lineage = cur.dataset_id
        for v in kept:
            m = self.manifest(v)
            if m.dataset_id != lineage:  # an overwritten dataset's versions go too
                kept = [k for k in kept if k != v]
                continue
            referenced.update(p.path for p in m.parts)
        dead_manifests = [manifest_key(v) for v in versions if v not in kept]
        dead_manifests += [k for k in self.store.list(MANIFESTS)
                           if k not in {manifest_key(v) for v in versions}]
        dead_parts = [k for k in self.parts() if k not in referenced]
        self.store.delete(dead_parts)
        self.store.delete(dead_manifests)
        return len(dead_manifests), len(dead_parts)

    # -- the lease ----------------------------------------------------------------------------
    def acquire(self, owner: str, *, what: str = "sync") -> None:
        """Take the lease with a compare-and-swap, or raise naming the live holder.

        Advisory, like every lock over plain object storage: it keeps two hybridray syncs
        from interleaving commits and garbage collection. The lease is created only if absent
        (or taken over only if it still holds exactly the stale lease that was read), so two
        syncs starting at once cannot both win. A holder on this host whose process is gone,
        or whose lease expired (the holder renews it while it runs: ``renew``), is taken over.
        """
        raw = self._lease_bytes()
        if raw is not None:
            held = _parse(raw)
            if held.get("owner") != owner and not _stale(held):
                raise DataError(
                    f"{self.label}: another {held.get('what', 'sync')} holds the lease (pid "
                    f"{held.get('pid')} on {held.get('host')}, since {held.get('since')}); "
                    "wait for it to finish, or remove "
                    f"{self.label}/{LOCK} if that process is gone")
        if not self.store.swap(LOCK, _lease(owner, what), raw):
            raise DataError(f"{self.label}: another sync took the lease at the same moment; "
                            "rerun")

    def renew(self, owner: str, *, what: str = "sync") -> None:
        """Push the lease's expiry forward; raise if it is no longer ours."""
        raw = self._lease_bytes()
        held = _parse(raw) if raw is not None else {}
        if held.get("owner") != owner or not self.store.swap(LOCK, _lease(owner, what, held),
                                                             raw):
            raise DataError(f"{self.label}: this sync lost its lease (held by "
                            f"{held.get('owner', 'nobody')} now); nothing was committed, rerun")

    def check_lease(self, owner: str) -> None:
        """Raise unless ``owner`` holds the lease (checked just before a commit)."""
        raw = self._lease_bytes()
        if raw is None or _parse(raw).get("owner") != owner:
            raise DataError(f"{self.label}: this sync lost its lease before committing; "
                            "nothing was committed, rerun")

    def release(self, owner: str) -> None:
        raw = self._lease_bytes()
        if raw is not None and _parse(raw).get("owner") == owner:
            self.store.delete([LOCK])

    def _lease_bytes(self) -> bytes | None:
        return self.store.get(LOCK) if self.store.size(LOCK) is not None else None


class LeaseKeeper:
    """Renews a lease every ``every_s`` seconds from a daemon thread while a sync runs;
    ``check()`` re-raises a renewal that failed (the lease was lost)."""

    def __init__(self, store: DatasetStore, owner: str, every_s: float | None = None):
        import threading

        self.store, self.owner = store, owner
        self.every_s = LEASE_S / 5 if every_s is None else every_s
        self.error: BaseException | None = None
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hybridray-lease", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.store.renew(self.owner)
                self.renewals += 1
            except BaseException as e:  # noqa: BLE001  (reported by check())
                self.error = e
                return

    def check(self) -> None:
        if self.error is not None:
            raise self.error
        self.store.check_lease(self.owner)


def _lease(owner: str, what: str, held: dict | None = None) -> bytes:
    lease = {"owner": owner, "what": what, "host": socket.gethostname(),
             "pid": os.getpid(), "pid_start": process_start_time(os.getpid()),
             "since": (held or {}).get("since") or now_iso(),
             "expires": time.time() + LEASE_S}
    return json.dumps(lease).encode()


def _parse(raw: bytes) -> dict:
    try:
        held = json.loads(raw)
    except ValueError:
        return {}
    return held if isinstance(held, dict) else {}


def new_owner() -> str:
    return uuid.uuid4().hex


def _stale(held: dict) -> bool:
    if held.get("expires", 0) < time.time():
        return True
    if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
        return process_start_time(held["pid"]) != held.get("pid_start")
    return False

