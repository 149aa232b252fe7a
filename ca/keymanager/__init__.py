"""Key managers: where the server's authority keys live and how they sign.

A key manager is a plugin. It makes, finds and deletes keys by id, and hands
out :class:`Signer` objects; the CA only ever signs through a Signer, so a
key that never leaves Vault/OpenBao signs just like one kept in this process::

    manager = load_key_manager("disk", {}, data_dir=Path("/var/lib/tessera"))
    signer = manager.generate_key("x509-ca-a", KeyType.EC_P256)
    signature = signer.sign(b"data")          # DER ECDSA with SHA-256
    manager.get_key("x509-ca-a").public_key() == signer.public_key()

Built-ins: ``memory`` (keys vanish on restart; tests and demos), ``disk``
(encrypted PKCS#8 files) and ``vault_transit`` (keys that never leave a
Vault/OpenBao transit mount). :data:`KEY_MANAGERS` is their registry (see
:mod:`attestor.plugin`); its context is the server's data directory. A new key
manager is a module exporting ``PLUGIN``, listed there.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric import ec, padding

from attestor.plugin import PluginConfig, Registry
from sdk.keys import KeyType, PrivateKey, PublicKey, hash_for, key_type_of

__all__ = [
    "KEY_MANAGERS",
    "KeyManager",
    "LocalSigner",
    "Signer",
    "load_key_manager",
]


class Signer(Protocol):
    """One authority key, able to sign."""

    @property
    def key_id(self) -> str: ...

    @property
    def key_type(self) -> KeyType: ...

    def public_key(self) -> PublicKey: ...

    def sign(self, data: bytes) -> bytes:
        """Sign ``data``: ECDSA as a DER signature with SHA-256 (P-256) or SHA-384 (P-384);
        RSA as PKCS#1 v1.5 with SHA-256."""
        ...

    def local_private_key(self) -> PrivateKey | None:
        """The private key object when it lives in this process, else None (remote keys)."""
        ...


class KeyManager(Protocol):
    """Keeps authority keys by id."""

    name: str

    def generate_key(self, key_id: str, key_type: KeyType) -> Signer:
        """Make a new key under ``key_id``, replacing any key of that id."""
        ...

    def get_key(self, key_id: str) -> Signer:
        """The key of that id; NotFound if there is none."""
        ...

    def delete_key(self, key_id: str) -> None:
        """Forget the key of that id; nothing happens if there is none."""
        ...


class LocalSigner:
    """A Signer over a private key held in this process."""

    def __init__(self, key_id: str, private_key: PrivateKey) -> None:
        self._key_id = key_id
        self._private_key = private_key
        self._key_type = key_type_of(private_key)

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def key_type(self) -> KeyType:
        return self._key_type

    def public_key(self) -> PublicKey:
        return self._private_key.public_key()

    def sign(self, data: bytes) -> bytes:
        key = self._private_key
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(data, ec.ECDSA(hash_for(self._key_type)))
        return key.sign(data, padding.PKCS1v15(), hash_for(self._key_type))

    def local_private_key(self) -> PrivateKey | None:
        return self._private_key

    def __repr__(self) -> str:  # never show the key itself
        return f"LocalSigner(key_id={self._key_id!r}, key_type={self._key_type.value!r})"


KEY_MANAGERS: Registry[Path, KeyManager] = Registry(
    "key manager",
    "key_manager",
    {
        "disk": "ca.keymanager.disk",
        "memory": "ca.keymanager.memory",
        "vault_transit": "ca.keymanager.vault_transit",
    },
)
"""The built-in key managers; the context is the server's data directory."""


def load_key_manager(name: str, config: Mapping[str, Any], data_dir: Path) -> KeyManager:
    """The key manager called ``name``, configured from ``config``; ConfigError if unknown."""
    return KEY_MANAGERS.load(PluginConfig(name, config), data_dir)
