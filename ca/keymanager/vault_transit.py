"""The ``vault_transit`` key manager: authority keys that never leave a Vault/OpenBao transit mount.

Each key is a transit key named ``<key_prefix><key_id>``; Tessera holds only
its public key and asks transit to sign (one HTTP request per signature)::

    manager = load_key_manager(
        "vault_transit",
        {"address": "https://vault.example.org:8200", "token_file": "/run/tessera/token"},
        data_dir,
    )
    signer = manager.generate_key("x509-ca-a", KeyType.EC_P256)
    signer.sign(tbs_certificate)        # DER ECDSA with SHA-256, made by transit
    signer.local_private_key() is None  # so ca.x509ca signs through sign()

Configuration: the connection settings of :mod:`ca.vault` (address, token,
AppRole, ca_cert, timeout, ...) and

==============  ====================================================
``mount``       where transit is mounted; default ``transit``
``key_prefix``  prefix of the transit key names; default ``tessera-``
==============  ====================================================

Key types map to transit's ``ecdsa-p256``, ``ecdsa-p384``, ``rsa-2048`` and
``rsa-4096``. ECDSA signatures are asked for in ASN.1 DER (what X.509 needs),
RSA ones as PKCS#1 v1.5; SHA-384 for P-384, SHA-256 otherwise. A signer is
pinned to the transit key version whose public key it holds. Keys found once
are remembered (Tessera never changes a key after making it), so the server's
rotation tick does not ask Vault for them again.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import Field

from attestor.plugin import Plugin
from ca.vault import VaultClient, VaultConnection, VaultRequestFailed, VaultSettings
from sdk.errors import ConfigError, FailedPrecondition, InvalidArgument, NotFound
from sdk.keys import KeyType, PrivateKey, PublicKey, key_type_of

__all__ = ["PLUGIN", "TransitSigner", "VaultTransitKeyManager", "VaultTransitSettings"]

log = logging.getLogger(__name__)

NAME = "vault_transit"
WHAT = f"key manager {NAME!r}"
DEFAULT_MOUNT = "transit"
DEFAULT_KEY_PREFIX = "tessera-"

_TRANSIT_TYPES: dict[KeyType, str] = {
    KeyType.EC_P256: "ecdsa-p256",
    KeyType.EC_P384: "ecdsa-p384",
    KeyType.RSA_2048: "rsa-2048",
    KeyType.RSA_4096: "rsa-4096",
}
_KEY_TYPES = {transit: key_type for key_type, transit in _TRANSIT_TYPES.items()}
# Transit key names: word characters, '-' and '.', starting and ending with a word character.
_KEY_NAME = re.compile(r"^\w(?:[\w.-]{0,254}\w)?$", re.ASCII)
_KEY_PREFIX = re.compile(r"^\w[\w.-]{0,63}$", re.ASCII)
_MOUNT = re.compile(r"^[\w.-]+(?:/[\w.-]+)*$", re.ASCII)
_SIGNATURE = re.compile(r"^vault:v\d+:(?P<signature>[A-Za-z0-9+/=]+)$")


class TransitSigner:
    """A Signer whose private key stays in transit: only ``sign()`` and the public key."""

    def __init__(
        self,
        manager: VaultTransitKeyManager,
        key_id: str,
        public_key: PublicKey,
        key_version: int,
    ) -> None:
        self._manager = manager
        self._key_id = key_id
        self._public_key = public_key
        self._key_type = key_type_of(public_key)
        self._key_version = key_version

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def key_type(self) -> KeyType:
        return self._key_type

    @property
    def key_version(self) -> int:
        return self._key_version

    def public_key(self) -> PublicKey:
        return self._public_key

    def sign(self, data: bytes) -> bytes:
        return self._manager.sign(self, data)

    def local_private_key(self) -> PrivateKey | None:
        return None

    def __repr__(self) -> str:
        return (
            f"TransitSigner(key_id={self._key_id!r}, key_type={self._key_type.value!r}, "
            f"key_version={self._key_version})"
        )


class VaultTransitSettings(VaultConnection):
    """``[key_manager.vault_transit]``: the connection settings and these."""

    mount: str = Field(default=DEFAULT_MOUNT, min_length=1)
    key_prefix: str = Field(default=DEFAULT_KEY_PREFIX, min_length=1)


class VaultTransitKeyManager:
    name = NAME

    def __init__(
        self,
        client: VaultClient,
        *,
        mount: str = DEFAULT_MOUNT,
        key_prefix: str = DEFAULT_KEY_PREFIX,
    ) -> None:
        self._client = client
        self._mount = mount
        self._key_prefix = key_prefix
        self._lock = threading.Lock()
        self._signers: dict[str, TransitSigner] = {}

    @classmethod
    def from_settings(
        cls, settings: VaultTransitSettings, data_dir: Path
    ) -> VaultTransitKeyManager:
        mount = settings.mount.strip("/")
        if not _MOUNT.fullmatch(mount):
            raise ConfigError(f"{WHAT} mount {mount!r} is not a valid mount path")
        key_prefix = settings.key_prefix
        if not _KEY_PREFIX.fullmatch(key_prefix):
            raise ConfigError(
                f"{WHAT} key_prefix {key_prefix!r} cannot begin a transit key name; use "
                "up to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"
            )
        connection = VaultSettings.from_connection(settings, plugin=WHAT)
        return cls(VaultClient(connection, plugin=WHAT), mount=mount, key_prefix=key_prefix)

    @property
    def mount(self) -> str:
        return self._mount

    def transit_key_name(self, key_id: str) -> str:
        """The name of the transit key holding ``key_id``."""
        name = f"{self._key_prefix}{key_id}"
        if not _KEY_NAME.fullmatch(name):
            raise InvalidArgument(
                f"key id {key_id!r} cannot be part of a transit key name; use letters, "
                "digits, '_', '.' or '-', ending with a letter or digit"
            )
        return name

    # -- KeyManager -------------------------------------------------------------------

    def generate_key(self, key_id: str, key_type: KeyType) -> TransitSigner:
        name = self.transit_key_name(key_id)
        self.delete_key(key_id)  # "replacing any key of that id": a new key, not a new version
        data = self._client.write(
            f"{self._mount}/keys/{name}",
            {"type": _TRANSIT_TYPES[key_type]},
            policy_path=self._policy_path("keys"),
        )
        if "keys" not in data:  # older servers answer 204 without the key
            data = self._read_key(key_id, name)
        signer = self._signer_from(key_id, name, data)
        if signer.key_type is not key_type:
            raise FailedPrecondition(
                f"transit made key {name} of type {signer.key_type.value}, not "
                f"{key_type.value}; check the transit mount {self._mount}"
            )
        with self._lock:
            self._signers[key_id] = signer
        log.info("generated %s key %r as transit key %s/%s", key_type.value, key_id,
                 self._mount, name)
        return signer

    def get_key(self, key_id: str) -> TransitSigner:
        with self._lock:
            cached = self._signers.get(key_id)
        if cached is not None:
            return cached
        name = self.transit_key_name(key_id)
        signer = self._signer_from(key_id, name, self._read_key(key_id, name))
        with self._lock:
            self._signers[key_id] = signer
        return signer

    def delete_key(self, key_id: str) -> None:
        name = self.transit_key_name(key_id)
        with self._lock:
            self._signers.pop(key_id, None)
        path = f"{self._mount}/keys/{name}"
        if self._client.read(path, policy_path=self._policy_path("keys")) is None:
            return
        self._client.write(
            f"{path}/config",
            {"deletion_allowed": True},
            policy_path=self._policy_path("keys"),
        )
        self._client.delete(path, policy_path=self._policy_path("keys"))
        log.info("deleted key %r (transit key %s/%s)", key_id, self._mount, name)

    # -- signing ------------------------------------------------------------------------

    def sign(self, signer: TransitSigner, data: bytes) -> bytes:
        """Have transit sign ``data`` with ``signer``'s key version."""
        name = self.transit_key_name(signer.key_id)
        request: dict[str, Any] = {
            "input": base64.b64encode(data).decode("ascii"),
            "key_version": signer.key_version,
            "hash_algorithm": "sha2-384" if signer.key_type is KeyType.EC_P384 else "sha2-256",
        }
        if isinstance(signer.public_key(), ec.EllipticCurvePublicKey):
            request["marshaling_algorithm"] = "asn1"
        else:
            request["signature_algorithm"] = "pkcs1v15"
        try:
            answer = self._client.write(
                f"{self._mount}/sign/{name}", request, policy_path=self._policy_path("sign")
            )
        except VaultRequestFailed as err:
            if any("key not found" in error for error in err.errors):
                with self._lock:
                    self._signers.pop(signer.key_id, None)
                raise self._not_found(signer.key_id, name) from None
            raise
        return _decode_signature(answer.get("signature"), name)

    # -- helpers ------------------------------------------------------------------------

    def _read_key(self, key_id: str, name: str) -> dict[str, Any]:
        data = self._client.read(
            f"{self._mount}/keys/{name}", policy_path=self._policy_path("keys")
        )
        if data is None:
            raise self._not_found(key_id, name)
        return data

    def _signer_from(self, key_id: str, name: str, data: Mapping[str, Any]) -> TransitSigner:
        transit_type = data.get("type")
        if transit_type not in _KEY_TYPES:
            allowed = ", ".join(_KEY_TYPES)
            raise FailedPrecondition(
                f"transit key {self._mount}/{name} has type {transit_type!r}, which cannot "
                f"sign certificates; Tessera uses {allowed}"
            )
        try:
            version = int(data["latest_version"])
            pem = data["keys"][str(version)]["public_key"]
            public_key = serialization.load_pem_public_key(pem.encode("ascii"))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise FailedPrecondition(
                f"transit key {self._mount}/{name} has no readable public key"
            ) from None
        if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise FailedPrecondition(f"transit key {self._mount}/{name} is not an EC or RSA key")
        return TransitSigner(self, key_id, public_key, version)

    def _not_found(self, key_id: str, name: str) -> NotFound:
        return NotFound(
            f"key manager {NAME!r} has no key with id {key_id!r} (transit key "
            f"{self._mount}/keys/{name} at {self._client.address})"
        )

    def _policy_path(self, endpoint: str) -> str:
        return f"{self._mount}/{endpoint}/{self._key_prefix}*"


PLUGIN = Plugin(NAME, VaultTransitSettings, VaultTransitKeyManager.from_settings)


def _decode_signature(value: object, name: str) -> bytes:
    match = _SIGNATURE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise FailedPrecondition(
            f"transit answered a signature request for key {name} without a "
            "'vault:v<N>:<base64>' signature"
        )
    try:
        return base64.b64decode(match.group("signature"), validate=True)
    except (binascii.Error, ValueError):
        raise FailedPrecondition(
            f"transit's signature for key {name} is not valid base64"
        ) from None
