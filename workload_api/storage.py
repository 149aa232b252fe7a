"""What the agent keeps in its data directory, so a restart does not re-attest.

    storage = AgentStorage(Path("/var/lib/tessera/agent"))
    storage.prepare()                                  # mkdir, mode 0700, can it write?
    storage.save_identity(identity)                    # after attesting or renewing
    identity = storage.load_identity(trust_domain)     # None before the first attestation
    storage.save_bundle(bundle)                        # the trust bundle, pinned
    bundle = storage.load_bundle(trust_domain)

:meth:`AgentStorage.prepare` writes and removes a probe file before anything else
happens, so an agent whose data directory is read-only or full says so before it
spends its join token on an SVID it could not keep. A write that fails later (the
disk filled up meanwhile) is a ConfigError with the same sentence, never a traceback.

Files (every write goes to a temporary file renamed into place):

    agent-svid.pem   the agent's SVID, leaf first, then intermediates (0644)
    agent-svid.key   its private key, unencrypted PKCS#8 PEM (0600)
    agent.json       the agent's SPIFFE ID, how it attested, whether it may re-attest
    bundle.json      the trust bundle last received from the server (SPIFFE format)
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sdk.bundle import TrustBundle
from sdk.errors import ConfigError, InvalidArgument, NotAnX509Svid
from sdk.keys import PrivateKey
from sdk.peer import spiffe_id_from_certificate
from sdk.privatefiles import write_file_atomically
from sdk.spiffeid import SpiffeId, TrustDomain, parse_spiffe_id

__all__ = ["AgentIdentity", "AgentStorage", "svid_spiffe_id", "write_file_atomically"]

SVID_FILE: Final = "agent-svid.pem"
KEY_FILE: Final = "agent-svid.key"
META_FILE: Final = "agent.json"
BUNDLE_FILE: Final = "bundle.json"
PROBE_FILE: Final = ".write-probe"
PROBE_SIZE: Final = 64 * 1024
"""Room for everything the agent stores on attesting (its SVID, key, metadata and bundle:
four files, each at least a filesystem block) several times over, so a disk too full for
them shows up here, before the join token is spent."""


@dataclass(frozen=True)
class AgentIdentity:
    """The agent's own X509-SVID: what it presents to the server."""

    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKey
    attestation_type: str
    reattestable: bool
    """True when the node attestor can attest again by itself (x509pop); join tokens cannot."""

    @property
    def not_before(self) -> datetime:
        return self.chain[0].not_valid_before_utc

    @property
    def expires_at(self) -> datetime:
        return self.chain[0].not_valid_after_utc

    @property
    def renew_at(self) -> datetime:
        """Half-way through its life."""
        return self.not_before + (self.expires_at - self.not_before) / 2

    def expired(self, now: datetime) -> bool:
        return now >= self.expires_at

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)


def svid_spiffe_id(certificate: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID in a certificate's single URI SAN; InvalidArgument otherwise."""
    try:
        return spiffe_id_from_certificate(certificate, leaf=False)
    except NotAnX509Svid as err:
        if err.problem == "uri_sans":
            raise InvalidArgument(
                "the certificate is not an X509-SVID: it needs exactly one URI SAN"
            ) from None
        # Worded for the agent's files rather than for a TLS peer.
        return parse_spiffe_id(err.uri_sans[0], what="certificate URI SAN")


class AgentStorage:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def prepare(self) -> None:
        """Create the data directory 0700 (or tighten it to 0700 if this user owns it) and
        check the agent can write there: ConfigError, saying why, if it cannot."""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            info = self.data_dir.stat()
        except OSError as err:
            raise ConfigError(
                f"cannot create the agent's data directory {self.data_dir}: {err.strerror}; "
                "choose a --data-dir the agent can write"
            ) from err
        if stat.S_IMODE(info.st_mode) & 0o077:
            if info.st_uid != os.getuid():
                raise ConfigError(
                    f"the data directory {self.data_dir} is open to other users and not owned "
                    "by the agent's user; use a private directory (mode 0700)"
                )
            try:
                os.chmod(self.data_dir, 0o700)
            except OSError as err:
                raise self._unwritable(err) from err
        self._write(PROBE_FILE, bytes(PROBE_SIZE), 0o600)
        try:
            (self.data_dir / PROBE_FILE).unlink()
        except OSError as err:
            raise self._unwritable(err) from err

    # -- the agent's SVID ---------------------------------------------------------------

    def load_identity(self, trust_domain: TrustDomain) -> AgentIdentity | None:
        """The stored SVID, or None if the agent never attested with this data directory."""
        meta_path = self.data_dir / META_FILE
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            chain = tuple(x509.load_pem_x509_certificates((self.data_dir / SVID_FILE).read_bytes()))
            key = serialization.load_pem_private_key(
                (self.data_dir / KEY_FILE).read_bytes(), password=None
            )
        except (OSError, ValueError, TypeError) as err:
            raise ConfigError(
                f"the agent's identity in {self.data_dir} cannot be read ({_reason(err)}); "
                f"remove {META_FILE}, {SVID_FILE} and {KEY_FILE} there and attest again "
                "with a new join token"
            ) from err
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise ConfigError(f"{self.data_dir / KEY_FILE} does not hold an EC or RSA key")
        if key.public_key() != chain[0].public_key():
            raise ConfigError(
                f"the agent's key and SVID in {self.data_dir} do not belong together; remove "
                f"{META_FILE}, {SVID_FILE} and {KEY_FILE} there and attest again"
            )
        spiffe_id = svid_spiffe_id(chain[0])
        if spiffe_id.trust_domain != trust_domain:
            raise ConfigError(
                f"the data directory {self.data_dir} holds the identity of an agent of trust "
                f"domain {spiffe_id.trust_domain.name}, not {trust_domain.name}; "
                "use another --data-dir"
            )
        return AgentIdentity(
            spiffe_id=spiffe_id,
            chain=chain,
            private_key=key,
            attestation_type=str(meta.get("attestation_type", "")),
            reattestable=bool(meta.get("reattestable", False)),
        )

    def save_identity(self, identity: AgentIdentity) -> None:
        key_pem = identity.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        meta = {
            "spiffe_id": str(identity.spiffe_id),
            "attestation_type": identity.attestation_type,
            "reattestable": identity.reattestable,
        }
        self._write(KEY_FILE, key_pem, 0o600)
        self._write(SVID_FILE, identity.chain_pem(), 0o644)
        self._write(META_FILE, _json(meta), 0o644)

    # -- the trust bundle ---------------------------------------------------------------

    def load_bundle(self, trust_domain: TrustDomain) -> TrustBundle | None:
        path = self.data_dir / BUNDLE_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise ConfigError(
                f"cannot read the stored trust bundle {path}: {err.strerror}"
            ) from err
        try:
            return TrustBundle.from_spiffe_json(trust_domain, data)
        except InvalidArgument as err:
            raise ConfigError(
                f"the stored trust bundle {path} is not valid ({err.message}); remove it and "
                "start the agent with --trust-bundle"
            ) from err

    def save_bundle(self, bundle: TrustBundle) -> None:
        self._write(BUNDLE_FILE, bundle.to_spiffe_json(), 0o644)

    def _write(self, name: str, content: bytes, mode: int) -> None:
        try:
            write_file_atomically(self.data_dir / name, content, mode=mode)
        except OSError as err:
            raise self._unwritable(err) from err

    def _unwritable(self, err: OSError) -> ConfigError:
        return ConfigError(
            f"the agent cannot write to its data directory {self.data_dir} "
            f"({err.strerror or err}); give it a --data-dir on a writable filesystem with "
            "free space"
        )


def _json(document: dict[str, Any]) -> bytes:
    return json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"


def _reason(err: Exception) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    return str(err) or type(err).__name__
