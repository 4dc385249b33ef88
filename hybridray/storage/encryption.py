"""Parquet modular encryption with keys the cluster holds.

When a destination site's storage says ``encrypt_at_rest: true``, every part written there is
encrypted with Parquet modular encryption (``pyarrow.parquet.encryption``): columns and
footer under fresh data keys, which are wrapped by the site's master key and stored inside
the file (internal key material). The master keys come from ``ClusterSecrets``; the "KMS" is
``ClusterKms`` (built by ``cluster_kms``), an AES-GCM key-wrapping client over them. Parts are
encrypted where they are encoded (at the source site), so the bytes that cross the link are
already ciphertext.

A ``KeyRing`` carries just the master keys a task needs and is what travels to Ray workers;
a production deployment would swap ``ClusterKms`` for a client of its real KMS (Vault, AWS
KMS) behind the same two methods. It records the class of the data its keys open, and when
it is unpickled inside a Ray worker (a task argument) it runs the residency guard first: on
a node that may not hold that class (or a drift node) it refuses to come alive
(``ResidencyViolation``, audited as ``decryption keys``), so keys handed by mistake to work
at the wrong site are never usable there.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field

from hybridray.exceptions import DataError

ALGORITHM = "AES_GCM_V1"


@dataclass(frozen=True)
class KeyRing:
    """Master keys by id, plus which one encrypts new files (``footer_key``)."""

    cluster: str
    keys: dict[str, bytes] = field(repr=False)
    footer_key: str | None = None
    data_class: str | None = None   # of the data these keys open (None: not guarded)

    def __reduce__(self):
        return _restore_key_ring, (self.cluster, self.keys, self.footer_key, self.data_class)

    def encryption_properties(self):
        """``FileEncryptionProperties`` for a new file, or None without a footer key."""
        if self.footer_key is None:
            return None
        import pyarrow.parquet.encryption as pe

        config = pe.EncryptionConfiguration(
            footer_key=self.footer_key, uniform_encryption=True,
            encryption_algorithm=ALGORITHM, plaintext_footer=False, double_wrapping=True,
            internal_key_material=True)
        return self._factory().file_encryption_properties(self._connection(), config)

    def decryption_properties(self):
        """``FileDecryptionProperties`` that can open any file wrapped by these keys."""
        import pyarrow.parquet.encryption as pe

        return self._factory().file_decryption_properties(
            self._connection(), pe.DecryptionConfiguration())

    def describe(self) -> dict:
        """What a manifest records about the encryption (ids only, never key bytes)."""
        return {"algorithm": ALGORITHM, "kms": f"hybridray-cluster:{self.cluster}",
                "footer_key": self.footer_key}

    def _factory(self):
        import pyarrow.parquet.encryption as pe

        keys = self.keys
        return pe.CryptoFactory(lambda _config: cluster_kms(keys))

    def _connection(self):
        import pyarrow.parquet.encryption as pe

        return pe.KmsConnectionConfig(kms_instance_id=f"hybridray-{self.cluster}")


def _restore_key_ring(cluster: str, keys: dict[str, bytes], footer_key: str | None,
                      data_class: str | None) -> KeyRing:
    """Unpickle a ``KeyRing``; in a Ray worker, only where its data class may be held."""
    if data_class is not None:
        from hybridray.placement.guard import check_residency, in_worker

        if in_worker():
            check_residency(data_class, what="decryption keys")
    return KeyRing(cluster, keys, footer_key, data_class)


def cluster_kms(keys: dict[str, bytes]):
    """A ``ClusterKms`` over ``keys`` (the class is built on first use, importing pyarrow)."""
    global _KMS_CLASS
    if _KMS_CLASS is None:
        _KMS_CLASS = _build_kms_class()
    return _KMS_CLASS(keys)


_KMS_CLASS = None


def _build_kms_class():
    import pyarrow.parquet.encryption as pe

    try:
        import cryptography  # noqa: F401  (AES-GCM key wrapping)
    except ImportError:
        raise DataError('encryption at rest needs cryptography: pip install "hybridray[local]" '
                        "or pip install cryptography") from None

    class ClusterKms(pe.KmsClient):
        """A ``pyarrow.parquet.encryption.KmsClient`` that wraps data keys with AES-256-GCM."""

        def __init__(self, keys: dict[str, bytes]):
            super().__init__()
            self._keys = keys

        def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> str:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            nonce = os.urandom(12)
            sealed = AESGCM(self._key(master_key_identifier)).encrypt(
                nonce, bytes(key_bytes), master_key_identifier.encode())
            return base64.b64encode(nonce + sealed).decode()

        def unwrap_key(self, wrapped_key: str, master_key_identifier: str) -> bytes:
            from cryptography.exceptions import InvalidTag
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            raw = base64.b64decode(wrapped_key)
            try:
                return AESGCM(self._key(master_key_identifier)).decrypt(
                    raw[:12], raw[12:], master_key_identifier.encode())
            except InvalidTag:
                raise DataError(f"master key {master_key_identifier!r} cannot unwrap this "
                                "file's data key: the file or the key was changed") from None

        def _key(self, key_id: str) -> bytes:
            try:
                return self._keys[key_id]
            except KeyError:
                raise DataError(f"no master key {key_id!r} in this cluster's key ring; the "
                                "file was encrypted by another cluster") from None

    return ClusterKms


def key_ring(secrets, *, footer_site: str | None = None,
             read_ids: list[str] | tuple[str, ...] = (), data_class=None) -> KeyRing:
    """A ``KeyRing`` from ``ClusterSecrets``: to encrypt at ``footer_site`` and/or to read
    files whose manifests name ``read_ids``, holding data of ``data_class``."""
    footer = secrets.master_key_id(footer_site) if footer_site else None
    ids = sorted({*read_ids, *([footer] if footer else [])})
    cls = getattr(data_class, "value", data_class)
    return KeyRing(secrets.cluster, secrets.master_keys(ids) if ids else {}, footer, cls)
