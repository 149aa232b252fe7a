"""fetch_bundle against a real TLS server on loopback: how each profile authenticates
the bundle endpoint, and the sentences its failures become."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.datastore.records import FederationRelationship
from ca.federation.client import BundleFetchError, fetch_bundle
from sdk.bundle import TrustBundle
from sdk.keys import PrivateKey
from tests.unit.ca.federation_helpers import bundle, relationship, svid, web_pki

DOCUMENT = bundle("partner.org", 0, sequence=3).to_spiffe_json()
SERVER_ID = "spiffe://partner.org/tessera/server"


def pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def server_context(tmp_path: Path, leaf: x509.Certificate, key: PrivateKey) -> ssl.SSLContext:
    (tmp_path / "cert.pem").write_bytes(pem(leaf))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return context


def fetch_from(
    context: ssl.SSLContext,
    make: Callable[[str], FederationRelationship],
    stored: TrustBundle | None,
    *,
    status: str = "200 OK",
    body: bytes = DOCUMENT,
) -> bytes:
    """Serve one HTTPS answer on loopback and fetch it with the relationship ``make(url)``."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # the client gave up on our certificate
        finally:
            writer.close()

    async def run() -> bytes:
        server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        try:
            return await fetch_bundle(make(f"https://127.0.0.1:{port}/bundle"), stored)
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(run())


def spiffe_relationship(endpoint_id: str = SERVER_ID) -> Callable[[str], FederationRelationship]:
    return lambda url: relationship(url=url, endpoint_spiffe_id=endpoint_id)


def web_relationship(url: str) -> FederationRelationship:
    return relationship(url=url, profile="https_web", endpoint_spiffe_id=None)


def failure(*args: object, **kwargs: object) -> str:
    with pytest.raises(BundleFetchError) as failed:
        fetch_from(*args, **kwargs)  # type: ignore[arg-type]
    return failed.value.message


@pytest.fixture
def spiffe_server(tmp_path: Path) -> ssl.SSLContext:
    leaf, key = svid(SERVER_ID)
    return server_context(tmp_path, leaf, key)


# -- https_spiffe ----------------------------------------------------------------------


def test_https_spiffe_fetches_from_an_endpoint_with_the_expected_id(spiffe_server):
    fetched = fetch_from(spiffe_server, spiffe_relationship(), bundle("partner.org", 0))

    assert fetched == DOCUMENT


def test_https_spiffe_refuses_an_endpoint_with_another_id(spiffe_server):
    message = failure(
        spiffe_server, spiffe_relationship("spiffe://partner.org/other"), bundle("partner.org", 0)
    )

    assert message.endswith(
        f"/bundle presented {SERVER_ID}, not the expected endpoint SPIFFE ID "
        "spiffe://partner.org/other; check --endpoint-spiffe-id (or the URL)"
    )


def test_https_spiffe_refuses_a_chain_to_keys_not_in_the_stored_bundle(spiffe_server):
    message = failure(spiffe_server, spiffe_relationship(), bundle("partner.org", 1))

    assert "/bundle presented a certificate that does not verify against the stored bundle " \
        "of partner.org (unable to get local issuer certificate); if its keys changed while " \
        "refreshes were failing, give its current bundle with 'tessera server federation " \
        "update --trust-domain-bundle-path FILE'" in message


def test_https_spiffe_needs_a_stored_bundle(spiffe_server):
    message = failure(spiffe_server, spiffe_relationship(), None)

    assert message == (
        "no X.509 bundle of partner.org is stored to authenticate its https_spiffe endpoint "
        "with; give one with 'tessera server federation update --trust-domain partner.org "
        "--trust-domain-bundle-path FILE'"
    )


# -- https_web -------------------------------------------------------------------------


def test_https_web_trusts_the_system_cas_and_ssl_cert_file(tmp_path, monkeypatch):
    ca, leaf, key = web_pki()
    context = server_context(tmp_path, leaf, key)

    untrusted = failure(context, web_relationship, None)
    assert "/bundle presented a certificate that the system's trusted CAs do not verify for " \
        "its host (unable to get local issuer certificate); https_web needs a web PKI " \
        "certificate for the URL's host (a private CA can be trusted with SSL_CERT_FILE)" \
        in untrusted

    (tmp_path / "ca.pem").write_bytes(pem(ca))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    assert fetch_from(context, web_relationship, None) == DOCUMENT


def test_https_web_checks_the_host_name(tmp_path, monkeypatch):
    ca, leaf, key = web_pki("127.0.0.2")
    (tmp_path / "ca.pem").write_bytes(pem(ca))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))

    message = failure(server_context(tmp_path, leaf, key), web_relationship, None)

    assert "IP address mismatch" in message


# -- answers that are not a bundle -------------------------------------------------------


def test_an_http_error_status_says_to_check_the_url(spiffe_server):
    message = failure(
        spiffe_server, spiffe_relationship(), bundle("partner.org", 0), status="404 Not Found"
    )

    assert message.endswith(
        "/bundle answered HTTP 404; check the URL (it must be where the bundle document "
        "itself is served)"
    )


def test_an_oversized_answer_is_cut_off(spiffe_server):
    message = failure(
        spiffe_server, spiffe_relationship(), bundle("partner.org", 0), body=b" " * (1 << 20 | 1)
    )

    assert message.endswith(
        "/bundle sent more than 1048576 bytes; that is not a trust bundle"
    )


def test_an_endpoint_that_does_not_answer_is_unreachable():
    async def closed_port() -> int:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = int(server.sockets[0].getsockname()[1])
        server.close()
        await server.wait_closed()
        return port

    port = asyncio.run(closed_port())
    url = f"https://127.0.0.1:{port}"

    with pytest.raises(BundleFetchError) as failed:
        asyncio.run(fetch_bundle(web_relationship(url), None))

    assert failed.value.message.startswith(f"cannot reach the bundle endpoint {url} (")
    assert failed.value.message.endswith(
        "); check the URL and that the endpoint is serving"
    )
