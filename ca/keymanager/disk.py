"""The ``disk`` key manager: each key an encrypted PKCS#8 PEM file.

Every key is written to ``<keys_dir>/<key_id>.pem``, encrypted (PBES2,
AES-256-CBC) under a key-encryption key (KEK), created with mode 0600 and
moved into place atomically, so a crash never leaves half a key behind::

    manager = load_key_manager("disk", {"kek_file": "/etc/tessera/kek"}, data_dir)
    signer = manager.generate_key("x509-ca-a", KeyType.EC_P256)

Configuration (all optional):

==============  =====================================================
``keys_dir``    directory of the key files; default ``<data_dir>/keys`` (mode 0700)
``kek_file``    file holding the KEK (at least 16 bytes, surrounding whitespace ignored)
==============  =====================================================

The KEK comes from, in order: ``kek_file``; the ``TESSERA_KEK`` environment
variable; else a random 32-byte KEK generated once into ``<keys_dir>/kek``
(0600), so a quick start needs no setup. That last form keeps the KEK next to
the keys it protects: in production point ``kek_file`` at a secret mounted
from elsewhere (or set ``TESSERA_KEK``), e.g. one made with
``openssl rand -hex 32``. Keys and the KEK are never logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from attestor.plugin import Plugin
from attestor.settings import FilePath, Settings
from ca.keymanager import LocalSigner
from sdk.errors import ConfigError, InvalidArgument, NotFound
from sdk.keys import KeyType, generate_private_key
from sdk.privatefiles import write_file_atomically

log = logging.getLogger(__name__)

KEK_ENVIRONMENT_VARIABLE = "TESSERA_KEK"
GENERATED_KEK_FILE = "kek"
MIN_KEK_BYTES = 16
_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Kek:
    """A key-encryption key and where it came from."""

    secret: bytes
    source: str  # said in error messages; never the secret itself


class DiskSettings(Settings):
    """``[key_manager.disk]``."""

    keys_dir: FilePath | None = None
    kek_file: FilePath | None = None


class DiskKeyManager:
    name = "disk"

    def __init__(self, keys_dir: Path, kek: bytes, *, kek_source: str = "the given KEK") -> None:
        if len(kek) < MIN_KEK_BYTES:
            raise ConfigError(
                f"the key-encryption key from {kek_source} is shorter than {MIN_KEK_BYTES} "
                "bytes; use a long random secret, e.g. the output of `openssl rand -hex 32`"
            )
        self._keys_dir = keys_dir
        self._kek = Kek(kek, kek_source)
        self._lock = threading.Lock()
        # key_id -> (file identity, signer): decrypt once, re-read if the file changes.
        self._cache: dict[str, tuple[tuple[int, int, int], LocalSigner]] = {}

    @classmethod
    def from_settings(cls, settings: DiskSettings, data_dir: Path) -> DiskKeyManager:
        keys_dir = settings.keys_dir.expanduser() if settings.keys_dir else data_dir / "keys"
        _make_private_dir(keys_dir)
        kek_file = settings.kek_file.expanduser() if settings.kek_file else None
        kek = _load_kek(kek_file, keys_dir)
        return cls(keys_dir, kek.secret, kek_source=kek.source)

    @property
    def keys_dir(self) -> Path:
        return self._keys_dir

    def generate_key(self, key_id: str, key_type: KeyType) -> LocalSigner:
        path = self._path_for(key_id)
        private_key = generate_private_key(key_type)
        pem = private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(self._kek.secret),
        )
        signer = LocalSigner(key_id, private_key)
        with self._lock:
            write_file_atomically(path, pem)
            self._cache[key_id] = (_identity(path), signer)
        log.info("generated %s key %r in %s", key_type.value, key_id, self._keys_dir)
        return signer

    def get_key(self, key_id: str) -> LocalSigner:
        path = self._path_for(key_id)
        with self._lock:
            try:
                identity = _identity(path)
            except FileNotFoundError:
                self._cache.pop(key_id, None)
                raise NotFound(
                    f"key manager 'disk' has no key with id {key_id!r} in {self._keys_dir}"
                ) from None
            cached = self._cache.get(key_id)
            if cached is not None and cached[0] == identity:
                return cached[1]
            signer = LocalSigner(key_id, self._read_key(path))
            self._cache[key_id] = (identity, signer)
            return signer

    def delete_key(self, key_id: str) -> None:
        path = self._path_for(key_id)
        with self._lock:
            self._cache.pop(key_id, None)
            path.unlink(missing_ok=True)
        log.info("deleted key %r from %s", key_id, self._keys_dir)

    def _path_for(self, key_id: str) -> Path:
        if not _KEY_ID.fullmatch(key_id):
            raise InvalidArgument(
                f"key id {key_id!r} is not a safe file name; use 1 to 128 letters, digits, "
                "'.', '_' or '-', starting with a letter or digit"
            )
        return self._keys_dir / f"{key_id}.pem"

    def _read_key(self, path: Path) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
        data = path.read_bytes()
        try:
            key = serialization.load_pem_private_key(data, self._kek.secret)
        except (ValueError, TypeError):
            raise ConfigError(
                f"the key in {path} cannot be decrypted with the key-encryption key from "
                f"{self._kek.source}; check that kek_file or {KEK_ENVIRONMENT_VARIABLE} "
                "holds the same secret the key was written with, and that the file is "
                "an intact encrypted PKCS#8 PEM"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise ConfigError(f"the key in {path} is not an EC or RSA key")
        return key


PLUGIN = Plugin("disk", DiskSettings, DiskKeyManager.from_settings)


def configured_kek(kek_file: Path | None) -> Kek | None:
    """The key-encryption key from ``kek_file``, else from ``TESSERA_KEK``; None if
    neither is set. ConfigError if the file cannot be read, is empty or the KEK is short."""
    kek: Kek | None = None
    if kek_file is not None:
        try:
            secret = kek_file.read_bytes().strip()
        except OSError as err:
            raise ConfigError(
                f"cannot read the key-encryption key file {kek_file} ({err.strerror}); "
                "check the kek_file setting and the file's permissions"
            ) from None
        if not secret:
            raise ConfigError(f"the key-encryption key file {kek_file} is empty")
        kek = Kek(secret, f"kek_file {kek_file}")
    elif from_env := os.environ.get(KEK_ENVIRONMENT_VARIABLE, "").strip():
        kek = Kek(from_env.encode(), f"the {KEK_ENVIRONMENT_VARIABLE} environment variable")
    if kek is not None and len(kek.secret) < MIN_KEK_BYTES:
        raise ConfigError(
            f"the key-encryption key from {kek.source} is shorter than {MIN_KEK_BYTES} "
            "bytes; use a long random secret, e.g. the output of `openssl rand -hex 32`"
        )
    return kek


def _load_kek(kek_file: Path | None, keys_dir: Path) -> Kek:
    kek = configured_kek(kek_file)
    if kek is not None:
        return kek
    generated = keys_dir / GENERATED_KEK_FILE
    if not generated.exists():
        with contextlib.suppress(FileExistsError):  # another server made it first
            write_file_atomically(generated, secrets.token_hex(32).encode() + b"\n", replace=False)
            log.warning(
                "generated a key-encryption key in %s; in production set kek_file (or %s) "
                "to a secret kept apart from the keys",
                generated,
                KEK_ENVIRONMENT_VARIABLE,
            )
    secret = generated.read_bytes().strip()
    return Kek(secret, f"the generated file {generated}")


def _make_private_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"cannot create the keys directory {path} ({err.strerror}); "
            "check keys_dir / the data directory and their permissions"
        ) from None


def _identity(path: Path) -> tuple[int, int, int]:
    status = path.stat()
    return (status.st_ino, status.st_mtime_ns, status.st_size)
