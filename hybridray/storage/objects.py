"""Whole-object storage at a site: put, get, list, delete, with one class per provider.

The commit protocol needs exactly what every object store gives and nothing more: a write of
one object is atomic (all of it or none), a read sees a whole object, a listing sees what was
written. ``LocalStore`` gets there on a filesystem by writing a temporary file and renaming it;
``S3Store`` sends each object in one ``PutObject`` and reads it with one ``GetObject``: parts
are built in memory anyway, and one request per object is cheaper than a multipart upload of
a few chunks. (No ``Content-MD5``: the sync reads every part back and compares its sha256,
which catches more than the server's MD5 check would.)
``FsStore`` covers the rest (``gs://``) through pyarrow. Parquet *reading* (Ray Data, training)
keeps using the pyarrow filesystem from ``site_filesystem``, available as ``store.fs``.

Stores are small picklable values: an ``S3Store`` builds its boto3 client lazily in whatever
process uses it, so it can be handed to Ray tasks. Every failure surfaces as a ``DataError``
that names the site's storage and the object; network failures are retried a bounded number
of times first, so a store that is down fails in seconds.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from hybridray.exceptions import DataError
from hybridray.topology.models import Site

RETRIES = 3
CONNECT_TIMEOUT_S = 5.0


class ObjectStore:
    """Objects under one root (a directory, or a bucket and prefix), by relative key."""

    scheme = ""
    label: str
    root: str

    def put(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def list(self, prefix: str = "") -> dict[str, int]:
        """Keys under ``prefix`` (relative to the root) with their sizes."""
        return {k: v[0] for k, v in self.list_stat(prefix).items()}

    def list_stat(self, prefix: str = "") -> dict[str, tuple[int, int]]:
        """Keys under ``prefix`` with (size, modification time in ns)."""
        raise NotImplementedError

    def delete(self, keys: list[str]) -> None:
        raise NotImplementedError

    def exists(self) -> bool:
        """Whether anything is stored at the root."""
        raise NotImplementedError

    def size(self, key: str) -> int | None:
        """Size of ``key``, or None if it does not exist."""
        raise NotImplementedError

    def child(self, path: str) -> ObjectStore:
        """The store rooted at ``path`` below this one."""
        raise NotImplementedError

    @property
    def fs(self):
        """The pyarrow filesystem over the same storage (for Parquet readers)."""
        raise NotImplementedError

    def fs_path(self, key: str = "") -> str:
        """``key`` as a path inside ``fs``."""
        return f"{self.root}/{key}".rstrip("/") if key else self.root

    def iter_chunks(self, key: str, chunk: int = 8 << 20) -> Iterator[bytes]:
        """The object's bytes in chunks (to hash large objects without holding them)."""
        yield self.get(key)

    def get_text(self, key: str) -> str | None:
        """A small text object, or None if absent."""
        if self.size(key) is None:
            return None
        return self.get(key).decode("utf-8")

    def put_text(self, key: str, text: str) -> None:
        self.put(key, text.encode("utf-8"))

    def swap(self, key: str, data: bytes, expect: bytes | None) -> bool:
        """Compare-and-swap one small object: write ``data`` only if ``key`` now holds
        exactly ``expect`` (``None``: only if it does not exist). True if written.

        Stores that cannot do this atomically compare, then write (``FsStore``).
        """
        with self._errors("read", key):
            now = self.get(key) if self.size(key) is not None else None
        if now != expect:
            return False
        self.put(key, data)
        return True

    @contextlib.contextmanager
    def _errors(self, op: str, key: str) -> Iterator[None]:
        try:
            yield
        except DataError:
            raise
        except FileNotFoundError:
            raise DataError(f"{self._join(key)} does not exist{self.where()}") from None
        except Exception as e:  # OSError from pyarrow, botocore errors from boto3
            if _is_network(e):
                raise DataError(f"cannot {op} {self._join(key)}{self.where()}: storage "
                                f"unreachable after {RETRIES} attempts ({_short(e)}); check "
                                "that the endpoint is up and reachable from here") from None
            raise DataError(f"cannot {op} {self._join(key)}{self.where()}: "
                            f"{_short(e)}") from None

    def where(self) -> str:
        """Where the storage really is, for error messages."""
        return ""

    def _join(self, key: str) -> str:
        return _join_label(self.label, key)


# ---- local filesystem ---------------------------------------------------------------------

@dataclass(frozen=True)
class LocalStore(ObjectStore):
    """A directory; writes go to a temporary name and are renamed into place."""

    root: str
    label: str = ""
    site_root: str = ""   # the site's storage root: no key may resolve outside it
    scheme = "file"

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}"
                                                  ".tmp")
        with self._errors("write", key):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def get(self, key: str) -> bytes:
        with self._errors("read", key), open(self._path(key), "rb") as f:
            return f.read()

    def swap(self, key: str, data: bytes, expect: bytes | None) -> bool:
        """Compare-and-swap under an exclusive ``flock`` on a sidecar file: atomic for
        every process that reaches this directory through hybridray."""
        import fcntl

        path = self._path(key)
        with self._errors("write", key):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.cas"),
                         os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    with open(path, "rb") as f:
                        now = f.read()
                except FileNotFoundError:
                    now = None
                if now != expect:
                    return False
                self.put(key, data)
                return True
            finally:
                os.close(fd)

    def iter_chunks(self, key: str, chunk: int = 8 << 20) -> Iterator[bytes]:
        with self._errors("read", key), open(self._path(key), "rb") as f:
            while block := f.read(chunk):
                yield block

    def list_stat(self, prefix: str = "") -> dict[str, tuple[int, int]]:
        base = self._path(prefix)
        out: dict[str, tuple[int, int]] = {}
        with self._errors("list", prefix):
            for dirpath, _dirs, files in os.walk(base):
                for name in files:
                    if name.startswith(".") and name.endswith((".tmp", ".cas")):
                        continue  # a write in progress (or one a crash left behind), or
                        # the lock file of a compare-and-swap
                    full = os.path.join(dirpath, name)
                    st = os.stat(full)
                    out[os.path.relpath(full, self.root)] = (st.st_size, st.st_mtime_ns)
        return out

    def exists(self) -> bool:
        """The root itself exists (a directory)."""
        return os.path.isdir(self.root)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            with self._errors("delete", key), contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(key))

    def size(self, key: str) -> int | None:
        try:
            return os.path.getsize(self._path(key))
        except FileNotFoundError:
            return None

    def child(self, path: str) -> LocalStore:
        return LocalStore(f"{self.root}/{path.strip('/')}", _join_label(self.label, path),
                          self.site_root or self.root)

    @property
    def fs(self):
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem()

    def _path(self, key: str) -> str:
        path = f"{self.root}/{key}" if key else self.root
        self._check_resolved(path, key)
        return path

    def fs_path(self, key: str = "") -> str:
        return self._path(key)

    def _check_resolved(self, path: str, key: str) -> None:
        """Refuse a path that resolves anywhere but where it says, below the site root: a
        symlink (to another site's root, or anywhere) in the dataset's path or the key."""
        root = self.site_root or self.root
        rel = os.path.relpath(os.path.normpath(path), os.path.normpath(root))
        if rel == os.curdir:
            return
        expected = os.path.join(os.path.realpath(root), rel)
        if rel.startswith(os.pardir) or os.path.realpath(path) != expected:
            raise DataError(
                f"{self._join(key)}: {path} resolves to {os.path.realpath(path)}, not below the "
                f"site's storage root {root} as written (a symlink?); hybridray refuses to "
                "read or write through symlinks under a storage root: replace the link with "
                "a real directory, or use the site the data really belongs to")


# ---- S3 -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class S3Store(ObjectStore):
    """A bucket and prefix on S3 or an S3-compatible server (``endpoint``)."""

    bucket: str
    prefix: str
    endpoint: str | None = None
    region: str | None = None
    label: str = ""
    retries: int = RETRIES
    _client: list = field(default_factory=list, compare=False, repr=False)  # lazily, per process
    scheme = "s3"

    @property
    def root(self) -> str:  # type: ignore[override]
        return f"{self.bucket}/{self.prefix}".rstrip("/")

    def put(self, key: str, data: bytes) -> None:
        body = data if isinstance(data, bytes) else _BufferBody(data)
        with self._errors("write", key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body,
                                   ContentLength=len(memoryview(data)))

    def get(self, key: str) -> bytes:
        with self._errors("read", key):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            except self.client.exceptions.NoSuchKey:
                raise FileNotFoundError(key) from None
            return body.read()

    def swap(self, key: str, data: bytes, expect: bytes | None) -> bool:
        """Compare-and-swap with S3's conditional writes: ``If-None-Match: *`` to create,
        ``If-Match: ETAG`` (of the object read as ``expect``) to replace."""
        from botocore.exceptions import ClientError

        with self._errors("write", key):
            kwargs: dict = {}
            if expect is None:
                kwargs["IfNoneMatch"] = "*"
            else:
                try:
                    got = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
                except self.client.exceptions.NoSuchKey:
                    return False
                if got["Body"].read() != expect:
                    return False
                kwargs["IfMatch"] = got["ETag"]
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                       **kwargs)
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409",
                            "NoSuchKey"):
                    return False
                raise
            return True

    def iter_chunks(self, key: str, chunk: int = 8 << 20) -> Iterator[bytes]:
        with self._errors("read", key):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            except self.client.exceptions.NoSuchKey:
                raise FileNotFoundError(key) from None
            yield from body.iter_chunks(chunk)

    def list_stat(self, prefix: str = "") -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        full = self._key(prefix)
        if full and not full.endswith("/"):
            full += "/"
        with self._errors("list", prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full)
            for page in pages:
                for obj in page.get("Contents", ()):
                    mtime = int(obj["LastModified"].timestamp() * 1e9)
                    out[obj["Key"][len(self._key("")):].lstrip("/")] = (obj["Size"], mtime)
        return out

    def exists(self) -> bool:
        return bool(self.list_stat())

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[i:i + 1000]]
            with self._errors("delete", keys[i]):
                self.client.delete_objects(Bucket=self.bucket,
                                           Delete={"Objects": batch, "Quiet": True})

    def size(self, key: str) -> int | None:
        from botocore.exceptions import ClientError

        with self._errors("read", key):
            try:
                return self.client.head_object(Bucket=self.bucket,
                                               Key=self._key(key))["ContentLength"]
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise

    def child(self, path: str) -> S3Store:
        prefix = f"{self.prefix}/{path.strip('/')}".strip("/")
        return S3Store(self.bucket, prefix, self.endpoint, self.region,
                       _join_label(self.label, path), self.retries)

    def where(self) -> str:
        at = f" at {self.endpoint}" if self.endpoint else ""
        return f" (s3://{self.root}{at})"

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (emulators start empty)."""
        from botocore.exceptions import ClientError

        with self._errors("create bucket", self.bucket):
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError:
                self.client.create_bucket(Bucket=self.bucket)

    @property
    def client(self):
        if not self._client:
            self._client.append(_boto3_client(self.endpoint, self.region, self.retries))
        return self._client[0]

    @property
    def fs(self):
        from hybridray.storage.fs import s3_filesystem

        return s3_filesystem(self.endpoint, region=self.region, retries=self.retries)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}".strip("/") if self.prefix else key

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_client"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        object.__setattr__(self, "_client", [])


class _BufferBody:
    """A seekable, read-only file over any buffer (a ``pyarrow.Buffer``), without copying
    it into ``bytes`` first: what botocore needs to send, and re-send on a retry."""

    def __init__(self, data):
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n is None or n < 0 else min(self._pos + n, len(self._view))
        chunk = self._view[self._pos:end].tobytes()
        self._pos = end
        return chunk

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: len(self._view)}[whence]
        self._pos = max(0, min(base + pos, len(self._view)))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def __len__(self) -> int:
        return len(self._view)


def _boto3_client(endpoint: str | None, region: str | None, retries: int):
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise DataError('S3 storage needs boto3: pip install "hybridray[aws]"') from None
    from hybridray.storage.fs import is_loopback

    kwargs = {}
    if endpoint and is_loopback(endpoint) and not os.environ.get("AWS_ACCESS_KEY_ID"):
        from hybridray.storage.s3server import EMULATOR_ACCESS_KEY, EMULATOR_SECRET_KEY

        kwargs = {"aws_access_key_id": EMULATOR_ACCESS_KEY,
                  "aws_secret_access_key": EMULATOR_SECRET_KEY}
    config = Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=60,
                    retries={"max_attempts": retries, "mode": "standard"},
                    s3={"addressing_style": "path"} if endpoint else None,
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required")
    return boto3.session.Session().client("s3", endpoint_url=endpoint,
                                          region_name=region or "us-east-1", config=config,
                                          **kwargs)


# ---- anything pyarrow reaches -------------------------------------------------------------

@dataclass(frozen=True)
class FsStore(ObjectStore):
    """Any pyarrow filesystem (``gs://``); single-object writes are atomic there."""

    filesystem: object
    root: str
    label: str = ""
    scheme = "gs"

    def put(self, key: str, data: bytes) -> None:
        with self._errors("write", key), self.filesystem.open_output_stream(
                self.fs_path(key)) as out:
            out.write(data)

    def get(self, key: str) -> bytes:
        with self._errors("read", key):
            f = self.filesystem.open_input_file(self.fs_path(key))
            return f.read_at(f.size(), 0).to_pybytes()

    def list_stat(self, prefix: str = "") -> dict[str, tuple[int, int]]:
        import pyarrow.fs as pafs

        with self._errors("list", prefix):
            sel = pafs.FileSelector(self.fs_path(prefix), recursive=True, allow_not_found=True)
            return {i.path[len(self.root) + 1:]: (i.size, i.mtime_ns or 0)
                    for i in self.filesystem.get_file_info(sel) if i.type == pafs.FileType.File}

    def exists(self) -> bool:
        return bool(self.list_stat())

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            with self._errors("delete", key):
                self.filesystem.delete_file(self.fs_path(key))

    def size(self, key: str) -> int | None:
        import pyarrow.fs as pafs

        with self._errors("read", key):
            info = self.filesystem.get_file_info(self.fs_path(key))
        return None if info.type == pafs.FileType.NotFound else info.size

    def child(self, path: str) -> FsStore:
        return FsStore(self.filesystem, f"{self.root}/{path.strip('/')}",
                       _join_label(self.label, path))

    @property
    def fs(self):
        return self.filesystem


def site_store(name: str, site: Site) -> ObjectStore:
    """The object store at the root of site ``name``'s storage."""
    storage = site.storage
    label = f"{name}:"
    if storage.scheme == "file":
        return LocalStore(storage.path.rstrip("/"), label, storage.path.rstrip("/"))
    if storage.scheme == "s3":
        bucket, _, prefix = storage.path.strip("/").partition("/")
        return S3Store(bucket, prefix, storage.endpoint, storage.region, label)
    from hybridray.storage.fs import site_filesystem

    fs, base = site_filesystem(site)
    return FsStore(fs, base, label)


def dataset_store(topology, address) -> ObjectStore:
    """The store rooted at a ``DatasetAddress`` (``site:path``)."""
    return site_store(address.site, topology.sites[address.site]).child(address.path)


def ensure_emulated_bucket(store: ObjectStore) -> None:
    """Create the bucket of an S3 store on a loopback emulator (it starts empty); real
    buckets are never created by hybridray."""
    from hybridray.storage.fs import is_loopback

    if isinstance(store, S3Store) and store.endpoint and is_loopback(store.endpoint):
        store.ensure_bucket()


def _is_network(e: Exception) -> bool:
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import ReadTimeoutError
    except ImportError:
        BotoConnectionError = ReadTimeoutError = ()  # noqa: N806
    if isinstance(e, (BotoConnectionError, ReadTimeoutError)):
        return True
    text = str(e)
    return "NETWORK_CONNECTION" in text or "curlCode" in text


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:400]


def _join_label(label: str, path: str) -> str:
    path = path.strip("/")
    if not path:
        return label
    return f"{label}{path}" if label.endswith(":") else f"{label}/{path}"
