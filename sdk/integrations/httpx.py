"""httpx clients that speak mTLS with the workload's SVID and authorize the server.

::

    from sdk.integrations.httpx import httpx_client, bearer_auth

    with httpx_client(source, authorize_id("spiffe://example.org/api")) as client:
        client.get("https://api.internal:8443/items")

    async with async_httpx_client(source, authorize_member_of("example.org")) as client:
        await client.get("https://api.internal:8443/items")

    # JWT-SVIDs instead of (or on top of) mTLS:
    httpx.get(url, auth=bearer_auth(jwt_source, "spiffe://example.org/api"))

Rotation: the client's ``SSLContext`` (from :mod:`sdk.tls`) adopts the
current SVID and bundles at every handshake. The transport also starts a
fresh connection pool after each change of the source, so keep-alive
connections made with the old material are not reused for new requests;
the old pool closes once the requests still running on it are done.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import httpx
from spiffe import JwtSvid, SpiffeId

from sdk.authorize import Authorizer
from sdk.clock import SYSTEM_CLOCK, Clock
from sdk.sources import ChangeCounter, JwtSource, X509Source
from sdk.tls import mtls_client_context

__all__ = [
    "AsyncMtlsTransport",
    "JwtSvidAuth",
    "MtlsTransport",
    "async_httpx_client",
    "bearer_auth",
    "httpx_client",
]


def httpx_client(source: X509Source, authorizer: Authorizer, **client_options: Any) -> httpx.Client:
    """An ``httpx.Client`` over mTLS; ``client_options`` go to ``httpx.Client``."""
    return httpx.Client(transport=MtlsTransport(source, authorizer), **client_options)


def async_httpx_client(
    source: X509Source, authorizer: Authorizer, **client_options: Any
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` over mTLS; ``client_options`` go to ``httpx.AsyncClient``."""
    return httpx.AsyncClient(transport=AsyncMtlsTransport(source, authorizer), **client_options)


def bearer_auth(
    jwt_source: JwtSource,
    audience: str | Iterable[str],
    *,
    subject: SpiffeId | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> JwtSvidAuth:
    """Send ``Authorization: Bearer <JWT-SVID>`` for ``audience`` on every request."""
    return JwtSvidAuth(jwt_source, audience, subject=subject, clock=clock)


# -- transports --------------------------------------------------------------------------


@dataclass
class _Pool:
    transport: Any
    active: int = 0
    retired: bool = False


class MtlsTransport(httpx.BaseTransport):
    """An ``httpx.HTTPTransport`` over mTLS, with a fresh pool after every rotation.

    ``transport_options`` (``http2``, ``limits``, ``retries``...) go to
    ``httpx.HTTPTransport``.
    """

    def __init__(
        self, source: X509Source, authorizer: Authorizer, **transport_options: Any
    ) -> None:
        self._context = mtls_client_context(source, authorizer)
        self._options = transport_options
        self._changes = ChangeCounter(source)
        self._lock = threading.Lock()
        self._built_for = self._changes.value
        self._pool = self._new_pool()
        self._retired: list[_Pool] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            idle = self._rotate_if_changed()
            pool = self._pool
            pool.active += 1
        for stale in idle:
            stale.transport.close()
        try:
            response: httpx.Response = pool.transport.handle_request(request)
        except BaseException:
            self._release(pool)
            raise
        assert isinstance(response.stream, httpx.SyncByteStream)
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_ReleasingStream(response.stream, lambda: self._release(pool)),
            extensions=response.extensions,
        )

    def close(self) -> None:
        with self._lock:
            pools = [self._pool, *self._retired]
            self._retired = []
        for pool in pools:
            pool.transport.close()

    def _new_pool(self) -> _Pool:
        return _Pool(httpx.HTTPTransport(verify=self._context, **self._options))

    def _rotate_if_changed(self) -> list[_Pool]:
        """Under the lock: start a new pool if the source moved; returns pools to close now."""
        changes = self._changes.value
        if changes == self._built_for:
            return []
        self._built_for = changes
        old, self._pool = self._pool, self._new_pool()
        old.retired = True
        if old.active:
            self._retired.append(old)
            return []
        return [old]

    def _release(self, pool: _Pool) -> None:
        with self._lock:
            pool.active -= 1
            done = pool.retired and pool.active == 0 and pool in self._retired
            if done:
                self._retired.remove(pool)
        if done:
            pool.transport.close()


class AsyncMtlsTransport(httpx.AsyncBaseTransport):
    """An ``httpx.AsyncHTTPTransport`` over mTLS, with a fresh pool after every rotation."""

    def __init__(
        self, source: X509Source, authorizer: Authorizer, **transport_options: Any
    ) -> None:
        self._context = mtls_client_context(source, authorizer)
        self._options = transport_options
        self._changes = ChangeCounter(source)
        self._built_for = self._changes.value
        self._pool = self._new_pool()
        self._retired: list[_Pool] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        changes = self._changes.value
        if changes != self._built_for:
            self._built_for = changes
            old, self._pool = self._pool, self._new_pool()
            old.retired = True
            if old.active:
                self._retired.append(old)
            else:
                await old.transport.aclose()
        pool = self._pool
        pool.active += 1
        try:
            response: httpx.Response = await pool.transport.handle_async_request(request)
        except BaseException:
            await self._release(pool)
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_AsyncReleasingStream(response.stream, lambda: self._release(pool)),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        pools, self._retired = [self._pool, *self._retired], []
        for pool in pools:
            await pool.transport.aclose()

    def _new_pool(self) -> _Pool:
        return _Pool(httpx.AsyncHTTPTransport(verify=self._context, **self._options))

    async def _release(self, pool: _Pool) -> None:
        pool.active -= 1
        if pool.retired and pool.active == 0 and pool in self._retired:
            self._retired.remove(pool)
            await pool.transport.aclose()


class _ReleasingStream(httpx.SyncByteStream):
    """A response body that tells its pool when it is done."""

    def __init__(self, stream: httpx.SyncByteStream, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> Iterator[bytes]:
        yield from self._stream

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


class _AsyncReleasingStream(httpx.AsyncByteStream):
    def __init__(self, stream: httpx.AsyncByteStream, release: Callable[[], Any]) -> None:
        self._stream = stream
        self._release: Callable[[], Any] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            release, self._release = self._release, None
            if release is not None:
                await release()


# -- JWT-SVIDs as bearer tokens ----------------------------------------------------------


class JwtSvidAuth(httpx.Auth):
    """Adds ``Authorization: Bearer <JWT-SVID>``; a token is reused until half its life is gone."""

    def __init__(
        self,
        source: JwtSource,
        audience: str | Iterable[str],
        *,
        subject: SpiffeId | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._source = source
        self._audience = [audience] if isinstance(audience, str) else list(audience)
        self._subject = subject
        self._clock = clock
        self._lock = threading.Lock()
        self._svid: JwtSvid | None = None
        self._refresh_at = 0.0

    def token(self) -> str:
        """The JWT-SVID to send now (fetched from the source when none is fresh enough)."""
        with self._lock:
            now = self._clock.now().timestamp()
            if self._svid is None or now >= self._refresh_at:
                self._svid = self._source.fetch_jwt_svid(self._audience, self._subject)
                self._refresh_at = now + (self._svid.expiry - now) / 2
            return self._svid.token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.token()}"
        yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = await anyio.to_thread.run_sync(self.token)  # the Workload API call blocks
        request.headers["Authorization"] = f"Bearer {token}"
        yield request
