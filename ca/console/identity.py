"""The console's own X509-SVID and the admin SPIFFE IDs it lets in (``--mtls``).

The console mints its SVID through the admin API (as ``tessera server x509 mint``
does), presents it, and renews it at half its life; the TLS context follows
(:func:`sdk.tls.server_context` rebuilds when the version moves). Callers must present
an X509-SVID of the trust domain; whether its SPIFFE ID is registered as admin (an
entry with ``admin``) is asked of the set kept here, refreshed whenever the server's
entries change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from ca.console.sources import AdminSource, SourceError
from sdk.authorize import authorize_any
from sdk.bundle import TrustBundle
from sdk.spiffeid import parse_spiffe_id
from sdk.tls import TlsMaterial, server_context

log = logging.getLogger(__name__)

SVID_TTL = "1h"
RETRY_SECONDS = 5.0


@dataclass(frozen=True)
class _Minted:
    chain: tuple[x509.Certificate, ...]
    key: PrivateKeyTypes
    bundle: TrustBundle
    expires_at: float
    serial: str


class ConsoleIdentity:
    def __init__(self, admin: AdminSource, spiffe_id: str) -> None:
        self._admin = admin
        self._spiffe_id = parse_spiffe_id(spiffe_id)
        self._minted: _Minted | None = None
        self._admins: frozenset[str] = frozenset()
        self._task: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Mint the first SVID and read the admin IDs; SourceError if the server refuses."""
        self._minted = await self._mint()
        await self._read_admins()
        self._task = asyncio.create_task(self._renew())

    async def stop(self) -> None:
        for task in (self._task, self._refreshing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def is_admin(self, spiffe_id: str) -> bool:
        return spiffe_id in self._admins

    def changed(self, what: list[str]) -> None:
        """Told of the server's changes: re-read the admin IDs when entries changed."""
        if "entries" in what and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.create_task(self._read_admins())

    def context(self) -> ssl.SSLContext:
        def material() -> TlsMaterial:
            minted = self._minted
            assert minted is not None
            return TlsMaterial(minted.chain, minted.key, [minted.bundle])

        return server_context(material, version=lambda: self._minted and self._minted.serial,
                              authorizer=authorize_any(), client_certificate="required")

    async def _read_admins(self) -> None:
        try:
            found = await self._admin.get("/v1/entries")
        except SourceError as err:
            log.warning("could not read the admin entries: %s", err)
            return
        self._admins = frozenset(e["spiffe_id"] for e in found["entries"] if e.get("admin"))

    async def _mint(self) -> _Minted:
        answer = await self._admin.post("/v1/x509/mint",
                                        {"spiffe_id": str(self._spiffe_id), "ttl": SVID_TTL})
        chain = tuple(x509.load_pem_x509_certificates(answer["svid"].encode()))
        key = load_pem_private_key(answer["key"].encode(), password=None)
        bundle = TrustBundle.from_pem(self._spiffe_id.trust_domain, answer["bundle"].encode())
        return _Minted(chain, key, bundle, float(answer["expires_at"]), str(answer["serial"]))

    async def _renew(self) -> None:
        while True:
            minted = self._minted
            assert minted is not None
            half = max((minted.expires_at - time.time()) / 2, RETRY_SECONDS)
            await asyncio.sleep(half)
            try:
                self._minted = await self._mint()
            except SourceError as err:
                log.warning("could not renew the console's SVID: %s", err)
                await asyncio.sleep(RETRY_SECONDS)
