"""Identity headers a caller sends never reach the app, whatever their spelling.

A WSGI server folds ``-`` and ``_`` into ``_`` and joins repeated fields with
commas (``HTTP_X_FORWARDED_CLIENT_SPIFFE_ID``), so a forged
``X_Forwarded_Client_Spiffe_Id`` would land in front of the sidecar's own value.
The app here is a real WSGI server (``wsgiref``) in a thread that echoes the
environ it was given; requests go through the real proxy in HTTP mode.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from spiffe import X509Svid

from sdk.sidecar.http_exchange import reserved_identity_header
from sdk.sidecar.proxy import Proxy
from sdk.sources import StaticX509Source
from tests.unit.sdk.conftest import API_ID, WEB_ID, LoopThread, TestCA
from tests.unit.sdk.test_sidecar_proxy import (
    Running,
    inbound,
    leaf_hash,
    read_response,
    tls_socket,
)

FORGED = "spiffe://example.org/admin"


def echo_environ(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """The app: the HTTP_* variables it was given, as JSON."""
    seen = {key: value for key, value in environ.items() if key.startswith("HTTP_")}
    body = json.dumps(seen).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])  # fmt: skip
    return [body]


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def wsgi_app() -> Iterator[WSGIServer]:
    server = make_server("127.0.0.1", 0, echo_environ, handler_class=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(loop_thread: LoopThread, wsgi_app: WSGIServer,
          api_source: StaticX509Source) -> Iterator[Running]:  # fmt: skip
    """An inbound HTTP listener in front of the WSGI app."""
    running = Running(loop_thread, Proxy(inbound(int(wsgi_app.server_address[1])), api_source))
    yield running
    running.stop()


Fields = list[tuple[str, str]]
Svid = X509Svid


def through_the_proxy(proxy: Running, ca: TestCA, forged: Fields) -> tuple[dict[str, str], Svid]:
    """GET /api with ``forged`` header fields sent as written; what the WSGI app saw."""
    web = StaticX509Source(ca.issue_x509_svid(WEB_ID), [ca.bundle()])
    fields = "".join(f"{name}: {value}\r\n" for name, value in forged)
    with tls_socket(web, proxy.port("in")) as tls:
        tls.sendall(f"GET /api HTTP/1.1\r\nHost: api\r\n{fields}Connection: close\r\n\r\n"
                    .encode())  # fmt: skip
        status, _, body = read_response(tls.makefile("rb"))
    assert status == 200, body
    return json.loads(body), web.x509_svid()


SPELLINGS = [
    pytest.param([("X_Forwarded_Client_Spiffe_Id", FORGED)], id="underscores"),
    pytest.param([("x_forwarded_client_spiffe_id", FORGED)], id="underscores-lower"),
    pytest.param([("X-FORWARDED-CLIENT-SPIFFE-ID", FORGED)], id="upper"),
    pytest.param([("x-Forwarded_client-SPIFFE_id", FORGED)], id="mixed"),
    pytest.param([("X_Forwarded_Client_Cert", f"By={API_ID};URI={FORGED}")], id="xfcc-underscores"),
    pytest.param([("x-forwarded-client-cert", f"URI={FORGED}")], id="xfcc-lower"),
    pytest.param([("X-Forwarded-Client-Spiffe-Id", FORGED),
                  ("X_Forwarded_Client_Spiffe_Id", FORGED),
                  ("x-forwarded-client-spiffe-id", FORGED),
                  ("X_FORWARDED_CLIENT_CERT", f"URI={FORGED}"),
                  ("X-Forwarded-Client-Cert", f"URI={FORGED}")], id="repeated-every-spelling"),
]  # fmt: skip


@pytest.mark.parametrize("forged", SPELLINGS)
def test_the_app_sees_only_the_sidecars_identity_headers(
    proxy: Running, ca: TestCA, forged: list[tuple[str, str]]
) -> None:
    seen, web = through_the_proxy(proxy, ca, forged)

    assert seen["HTTP_X_FORWARDED_CLIENT_SPIFFE_ID"] == WEB_ID
    assert seen["HTTP_X_FORWARDED_CLIENT_CERT"] == (
        f"By={API_ID};Hash={leaf_hash(web)};URI={WEB_ID}")
    assert FORGED not in json.dumps(seen)


def test_other_headers_with_underscores_pass_unchanged(proxy: Running, ca: TestCA) -> None:
    fields = [("X_Request_Id", "abc"), ("X-Forwarded-Client", "kept")]
    seen, _ = through_the_proxy(proxy, ca, fields)

    assert seen["HTTP_X_REQUEST_ID"] == "abc"
    assert seen["HTTP_X_FORWARDED_CLIENT"] == "kept"


@pytest.mark.parametrize("name", [
    "X-Forwarded-Client-Spiffe-Id", "x_forwarded_client_spiffe_id", "X_FORWARDED-CLIENT_CERT",
    "x-forwarded-client-cert",
])  # fmt: skip
def test_every_spelling_is_reserved(name: str) -> None:
    assert reserved_identity_header(name)


@pytest.mark.parametrize("name", ["X-Forwarded-For", "X_Forwarded_Client", "Client-Cert",
                                  "X-Forwarded-Client-Spiffe-Idx"])  # fmt: skip
def test_other_names_are_not(name: str) -> None:
    assert not reserved_identity_header(name)
