"""Handing a certificate chain and its private key to OpenSSL, never via the disk.

``ssl.SSLContext.load_cert_chain`` reads files only. On Linux the chain and
key go through anonymous memory files (``memfd_create``) that disappear when
closed; elsewhere through a private temporary directory, removed at once.

    load_identity(context, chain, private_key)
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

__all__ = [
    "load_identity",
]


def load_identity(
    context: ssl.SSLContext, chain: Sequence[x509.Certificate], private_key: PrivateKeyTypes
) -> None:
    """``context.load_cert_chain`` for in-memory material (leaf first, then intermediates)."""
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    key_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with _files(chain_pem, key_pem) as (chain_path, key_path):
        context.load_cert_chain(chain_path, key_path)


@contextlib.contextmanager
def _files(chain_pem: bytes, key_pem: bytes) -> Iterator[tuple[str, str]]:
    if hasattr(os, "memfd_create"):
        chain_fd = os.memfd_create("tessera-chain")
        key_fd = os.memfd_create("tessera-key")
        try:
            os.write(chain_fd, chain_pem)
            os.write(key_fd, key_pem)
            yield f"/proc/self/fd/{chain_fd}", f"/proc/self/fd/{key_fd}"
        finally:
            os.close(chain_fd)
            os.close(key_fd)
        return
    with tempfile.TemporaryDirectory() as directory:  # pragma: no cover - not Linux
        chain_path, key_path = Path(directory, "chain.pem"), Path(directory, "key.pem")
        chain_path.write_bytes(chain_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(key_pem)
        yield str(chain_path), str(key_path)
