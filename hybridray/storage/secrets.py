"""Secrets a cluster holds for its data: the masking salt and the Parquet master keys.

They live in ``$HYBRIDRAY_HOME/keys/NAME/`` (directory 0700, files 0600), next to the audit
log rather than inside ``clusters/NAME``: ``hybridray up`` recreates the cluster's state
directory, and a salt or key that changed with every restart would make yesterday's hashed
columns unjoinable with today's and yesterday's encrypted files unreadable. Nothing secret is
ever written into a cluster file, a manifest or a dataset; manifests record only a short
fingerprint of the salt, so a change of salt shows up as a change of masking.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
from pathlib import Path

from hybridray.audit import hybridray_home
from hybridray.exceptions import DataError

SALT_BYTES = 32
KEY_BYTES = 32  # AES-256 master keys


class ClusterSecrets:
    """The salt and master keys of one cluster, created on first use and kept across restarts."""

    def __init__(self, cluster: str, home: str | os.PathLike | None = None):
        self.cluster = cluster
        self.dir = hybridray_home(home) / "keys" / cluster

    def salt(self) -> bytes:
        """The cluster's masking salt (32 random bytes, created once)."""
        return self._file_bytes("salt.bin", SALT_BYTES)

    def salt_id(self) -> str:
        """A public fingerprint of the salt (safe to store in manifests)."""
        return hashlib.sha256(b"hybridray-salt-id\0" + self.salt()).hexdigest()[:16]

    def master_key_id(self, site: str) -> str:
        """The id of the master key that wraps the data keys of files stored at ``site``."""
        return f"{self.cluster}/{site}"

    def master_keys(self, ids: list[str] | None = None) -> dict[str, bytes]:
        """Master keys by id (created on demand for ids this cluster owns).

        Creation happens under an exclusive lock on the keys directory and re-reads the file
        inside it, so two first syncs at once (threads, processes, CLI runs) never overwrite
        each other's new key; the file is replaced by write-then-rename, never rewritten.
        """
        path = self.dir / "master-keys.json"
        keys = self._read_keys(path)
        wanted = ids or []
        missing = [k for k in wanted if k not in keys]
        if missing:
            foreign = [k for k in missing if not k.startswith(self.cluster + "/")]
            if foreign:
                raise DataError(f"no master key {foreign[0]!r} in {path}: the data was "
                                f"encrypted by another cluster's keys; copy that cluster's "
                                f"keys directory or read it there")
            with self._locked():
                keys = self._read_keys(path)  # what others created while we waited
                missing = [k for k in wanted if k not in keys]
                if missing:
                    for k in missing:
                        keys[k] = secrets.token_bytes(KEY_BYTES)
                    _write_private(path, json.dumps(
                        {k: base64.b64encode(v).decode() for k, v in keys.items()},
                        indent=2).encode())
        return {k: keys[k] for k in wanted} if ids is not None else keys

    def signing_key(self) -> bytes:
        """The cluster's HMAC key for manifests and checkpoint metadata (32 bytes, created
        once). Kept with the other secrets: whoever may edit a manifest without it is refused."""
        return self._file_bytes("signing.key", SALT_BYTES)

    # ---- files ----------------------------------------------------------------------------
    def _ensure_dir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)

    @contextlib.contextmanager
    def _locked(self):
        """An exclusive ``flock`` on ``DIR/.lock`` for creating secrets."""
        self._ensure_dir()
        fd = os.open(self.dir / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _file_bytes(self, name: str, size: int) -> bytes:
        path = self.dir / name
        if not path.exists():
            # Under the lock, and complete before it has its name (write, fsync, rename):
            # a reader never sees an empty or half-written file, and two creators agree on
            # the first one's bytes.
            with self._locked():
                if not path.exists():
                    _write_private(path, secrets.token_bytes(size))
        data = path.read_bytes()
        if len(data) != size:
            raise DataError(f"{path}: expected {size} bytes, found {len(data)}; restore it from "
                            "a backup (hashed columns and encrypted files depend on it)")
        return data

    @staticmethod
    def _read_keys(path: Path) -> dict[str, bytes]:
        if not path.exists():
            return {}
        try:
            return {k: base64.b64decode(v) for k, v in json.loads(path.read_text()).items()}
        except (ValueError, TypeError) as e:
            raise DataError(f"{path}: unreadable master keys ({e}); restore it from a "
                            "backup") from None


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
