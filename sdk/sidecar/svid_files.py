"""Writing an X509-SVID, its key and its bundles into a directory, all of them switched at once.

::

    written = write_svid_files(Path("/run/tessera/svid"), snapshot)
    written.spiffe_id, written.not_after      # what is in the files now

The directory then holds what nginx, envoy, curl or
:class:`sdk.sources.FileX509Source` read:

=====================  ==============================================================
``svid.pem``           the X509-SVID: leaf, then intermediates (PEM), mode 0644
``svid.key``           its private key, PKCS#8 PEM, unencrypted, mode 0600
``bundle.pem``         the CA certificates of the SVID's own trust domain, mode 0644
``federated/<td>.pem`` one file per federated trust domain (the directory may be empty)
=====================  ==============================================================

A reader must never see a certificate next to a key it does not belong to,
so each generation of files goes into a fresh hidden directory
(``.tessera-svid-XXXX``), every file written and fsynced, and then one
symlink, ``.tessera-svid``, is switched to it with an atomic rename. The names
above are symlinks through ``.tessera-svid``, made once. A failed write leaves
the previous generation in place and removes what it had half written. The
generation before the current one is kept (a reader may still be opening its
files); older ones are removed.

Federated bundles are kept apart from ``bundle.pem`` on purpose: a relying
party that puts them in one trust store lets a partner's CA vouch for IDs of
this trust domain. Concatenate them yourself where a tool takes one CA file
and checks SPIFFE IDs on its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import SpiffeId, X509Bundle

from sdk.sidecar.errors import SidecarError
from sdk.sources import X509Snapshot

__all__ = [
    "BUNDLE_FILE",
    "FEDERATED_DIR",
    "KEY_FILE",
    "SVID_FILE",
    "SvidFileSet",
    "WrittenSvid",
    "svid_file_set",
    "write_svid_files",
]

SVID_FILE: Final = "svid.pem"
KEY_FILE: Final = "svid.key"
BUNDLE_FILE: Final = "bundle.pem"
FEDERATED_DIR: Final = "federated"
CURRENT_LINK: Final = ".tessera-svid"
GENERATION_PREFIX: Final = ".tessera-svid-"

_PUBLIC_MODE: Final = 0o644
_KEY_MODE: Final = 0o600
_DIRECTORY_MODE: Final = 0o755


@dataclass(frozen=True)
class SvidFileSet:
    """The contents of one generation of files, by path relative to the directory."""

    spiffe_id: SpiffeId
    serial: int
    not_after: datetime
    files: Mapping[str, bytes]
    federated_trust_domains: tuple[str, ...]

    @property
    def digest(self) -> bytes:
        """Changes whenever any file would change."""
        hasher = hashlib.sha256()
        for name in sorted(self.files):
            hasher.update(name.encode() + b"\0" + self.files[name] + b"\0")
        return hasher.digest()


@dataclass(frozen=True)
class WrittenSvid:
    """What :func:`write_svid_files` put where."""

    directory: Path
    contents: SvidFileSet

    @property
    def spiffe_id(self) -> SpiffeId:
        return self.contents.spiffe_id

    @property
    def not_after(self) -> datetime:
        return self.contents.not_after

    @property
    def paths(self) -> tuple[Path, ...]:
        """The stable names a reader uses (``svid.pem``, ...), not the generation's."""
        return tuple(self.directory / name for name in sorted(self.contents.files))

    def as_json(self) -> dict[str, Any]:
        return {
            "event": "written",
            "spiffe_id": str(self.spiffe_id),
            "serial": f"{self.contents.serial:x}",
            "not_after": self.not_after.isoformat(),
            "directory": str(self.directory),
            "files": [str(p) for p in self.paths],
            "federated_trust_domains": list(self.contents.federated_trust_domains),
        }


def svid_file_set(snapshot: X509Snapshot) -> SvidFileSet:
    """The PEM files for ``snapshot``; SidecarError if it lacks its own trust domain's bundle."""
    svid = snapshot.svid
    own = snapshot.own_bundle
    if own is None or not own.x509_authorities:
        raise SidecarError(
            f"the Workload API sent no X.509 bundle for trust domain "
            f"{svid.spiffe_id.trust_domain.name}, so bundle.pem cannot be written"
        )
    key = svid.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    files = {
        SVID_FILE: b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.cert_chain),
        KEY_FILE: key,
        BUNDLE_FILE: _bundle_pem(own),
    }
    federated = snapshot.federated_bundles
    for bundle in federated:
        files[f"{FEDERATED_DIR}/{bundle.trust_domain.name}.pem"] = _bundle_pem(bundle)
    return SvidFileSet(
        spiffe_id=svid.spiffe_id,
        serial=svid.leaf.serial_number,
        not_after=svid.leaf.not_valid_after_utc,
        files=files,
        federated_trust_domains=tuple(b.trust_domain.name for b in federated),
    )


def write_svid_files(directory: Path, snapshot: X509Snapshot | SvidFileSet) -> WrittenSvid:
    """Write a new generation and switch to it atomically; OSError/SidecarError if it failed."""
    contents = snapshot if isinstance(snapshot, SvidFileSet) else svid_file_set(snapshot)
    directory = directory.absolute()
    directory.mkdir(parents=True, exist_ok=True)
    previous = _current_generation(directory)
    generation = Path(tempfile.mkdtemp(prefix=GENERATION_PREFIX, dir=directory))
    try:
        os.chmod(generation, _DIRECTORY_MODE)
        (generation / FEDERATED_DIR).mkdir(mode=_DIRECTORY_MODE)
        for name, content in contents.files.items():
            mode = _KEY_MODE if name == KEY_FILE else _PUBLIC_MODE
            _write_synced(generation / name, content, mode)
        _fsync_directory(generation / FEDERATED_DIR)
        _fsync_directory(generation)
        _point(directory / CURRENT_LINK, generation.name)
    except BaseException:
        shutil.rmtree(generation, ignore_errors=True)
        raise
    for name in (SVID_FILE, KEY_FILE, BUNDLE_FILE, FEDERATED_DIR):
        _ensure_stable_link(directory, name)
    _fsync_directory(directory)
    _remove_old_generations(directory, keep={generation.name, previous})
    return WrittenSvid(directory=directory, contents=contents)


def _bundle_pem(bundle: X509Bundle) -> bytes:
    authorities = sorted(bundle.x509_authorities, key=_authority_order)
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in authorities)


def _authority_order(certificate: x509.Certificate) -> tuple[datetime, int]:
    return certificate.not_valid_before_utc, certificate.serial_number


def _write_synced(path: Path, content: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), mode)  # whatever the umask
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _point(link: Path, target: str) -> None:
    """Make ``link`` a symlink to ``target`` in one rename (readers see the old or the new)."""
    temporary = link.with_name(f"{link.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    os.symlink(target, temporary)
    try:
        os.replace(temporary, link)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _ensure_stable_link(directory: Path, name: str) -> None:
    link = directory / name
    target = f"{CURRENT_LINK}/{name}"
    if link.is_symlink() and os.readlink(link) == target:
        return
    if link.is_dir() and not link.is_symlink():
        raise SidecarError(
            f"{link} is a directory, so it cannot become the link to the SVID files; move it "
            "away or give --dir a directory of its own"
        )
    _point(link, target)


def _current_generation(directory: Path) -> str | None:
    with contextlib.suppress(OSError):
        return os.readlink(directory / CURRENT_LINK)
    return None


def _remove_old_generations(directory: Path, *, keep: set[str | None]) -> None:
    for entry in _generations(directory):
        if entry.name not in keep:
            shutil.rmtree(entry, ignore_errors=True)


def _generations(directory: Path) -> Iterator[Path]:
    for entry in directory.iterdir():
        if entry.name.startswith(GENERATION_PREFIX) and entry.is_dir() and not entry.is_symlink():
            yield entry
