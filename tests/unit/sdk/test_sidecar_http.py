"""The sidecar's HTTP/1.1 reader: what it accepts, what it refuses and with which status."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from sdk.sidecar.errors import HttpError
from sdk.sidecar.http import (
    Body,
    BodyKind,
    RequestHead,
    copy_body,
    read_request_head,
    read_response_head,
    simple_response,
)
from sdk.sidecar.http_exchange import reserved_identity_header

T = TypeVar("T")


def run(data: bytes, action: Callable[[asyncio.StreamReader], Awaitable[T]]) -> T:
    async def main() -> T:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await action(reader)

    return asyncio.run(main())


def request(data: bytes) -> RequestHead | None:
    return run(data, read_request_head)


def refusal(data: bytes) -> tuple[int, str]:
    with pytest.raises(HttpError) as caught:
        request(data)
    return caught.value.status, caught.value.message


class Collector:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        return None


def copied(data: bytes, body: Body, *, status: int = 400,
           drop_trailer: Callable[[str], bool] = lambda name: False) -> bytes:
    sink = Collector()
    run(data, lambda reader: copy_body(reader, sink, body, status=status,
                                       drop_trailer=drop_trailer))
    return sink.data


# -- request heads -------------------------------------------------------------------------


def test_a_request_head_is_read_with_its_headers_and_decoded_path() -> None:
    head = request(
        b"GET /api/items%20x?q=1 HTTP/1.1\r\nHost: api\r\nX-Trace:  abc \r\n\r\nrest"
    )
    assert head is not None
    assert (head.method, head.target, head.version) == ("GET", "/api/items%20x?q=1", "HTTP/1.1")
    assert head.path == "/api/items x"
    assert head.headers == (("Host", "api"), ("X-Trace", "abc"))
    assert head.body == Body(BodyKind.NONE)
    assert head.keep_alive


def test_connection_close_and_http_1_0_end_keep_alive() -> None:
    closing = request(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    old = request(b"GET / HTTP/1.0\r\n\r\n")
    old_kept = request(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
    assert closing is not None and not closing.keep_alive
    assert old is not None and not old.keep_alive
    assert old_kept is not None and old_kept.keep_alive


def test_a_clean_end_before_a_request_is_none_and_leading_empty_lines_are_skipped() -> None:
    assert request(b"") is None
    head = request(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert head is not None and head.method == "GET"


def test_framing_of_request_bodies() -> None:
    length = request(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n")
    chunked = request(b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n")
    same_twice = request(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\n")
    assert length is not None and length.body == Body(BodyKind.LENGTH, 12)
    assert chunked is not None and chunked.body == Body(BodyKind.CHUNKED)
    assert same_twice is not None and same_twice.body == Body(BodyKind.LENGTH, 3)


def test_serialize_drops_and_adds_headers() -> None:
    head = request(
        b"GET /a HTTP/1.1\r\nHost: a\r\nx-forwarded-client-spiffe-id: spiffe://evil/x\r\n"
        b"X_Forwarded_Client_Spiffe_Id: spiffe://evil/y\r\n\r\n"
    )
    assert head is not None
    wire = head.serialize(
        remove=reserved_identity_header,
        add=[("X-Forwarded-Client-Spiffe-Id", "spiffe://example.org/web")],
    )
    assert wire == (
        b"GET /a HTTP/1.1\r\nHost: a\r\n"
        b"X-Forwarded-Client-Spiffe-Id: spiffe://example.org/web\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"GET /\r\n\r\n", 400, "the request line must be METHOD SP TARGET SP HTTP-VERSION"),
        (b"GET  / HTTP/1.1\r\n\r\n", 400,
         "the request line must be METHOD SP TARGET SP HTTP-VERSION"),
        (b"G(T / HTTP/1.1\r\n\r\n", 400, "the request method is not a valid token"),
        (b"GET / HTTP/x\r\n\r\n", 400,
         "the request line does not end with an HTTP version such as HTTP/1.1"),
        (b"GET / HTTP/2.0\r\n\r\n", 505, "HTTP/2.0 is not supported here; speak HTTP/1.1"),
        (b"CONNECT a:443 HTTP/1.1\r\n\r\n", 501, "CONNECT is not supported by this sidecar"),
        (b"GET http://a/x HTTP/1.1\r\nHost: a\r\n\r\n", 400,
         "send the request target as a path (origin-form), e.g. GET /items"),
        (b"GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n", 400,
         "the request target holds characters a URI may not"),
        (b"GET / HTTP/1.1\n\n", 400, "lines must end with CRLF"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, "an HTTP/1.1 request needs exactly one Host header"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400,
         "an HTTP/1.1 request needs exactly one Host header"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n  folded\r\n\r\n", 400,
         "obsolete line folding in the request headers is not allowed"),
        (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400, "a request header line is not NAME: VALUE"),
        (b"GET / HTTP/1.1\r\nHost a\r\n\r\n", 400, "a request header line is not NAME: VALUE"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n", 400,
         "the request header X-A holds a control character"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n", 400,
         "the connection closed in the middle of a line"),
        (b"\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\n\r\n", 400,
         "expected a request line, got empty lines"),
    ],
)
def test_malformed_request_heads_are_refused(data: bytes, status: int, message: str) -> None:
    assert refusal(data) == (status, message)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (b"/api/../admin", "the request path has '.' or '..' segments or an empty segment once "
         "decoded (path parameters after ';' aside); send it normalised"),
        (b"/api/%2e%2e/admin", "the request path has '.' or '..' segments or an empty segment "
         "once decoded (path parameters after ';' aside); send it normalised"),
        (b"/api%2F..%2Fadmin", "the request path has '.' or '..' segments or an empty segment "
         "once decoded (path parameters after ';' aside); send it normalised"),
        (b"//admin", "the request path has '.' or '..' segments or an empty segment once "
         "decoded (path parameters after ';' aside); send it normalised"),
        (b"/public/..;/admin", "the request path has '.' or '..' segments or an empty "
         "segment once decoded (path parameters after ';' aside); send it normalised"),
        (b"/public/%2e%2e;x=1/admin", "the request path has '.' or '..' segments or an empty "
         "segment once decoded (path parameters after ';' aside); send it normalised"),
        (b"/%ff", "the request path is not UTF-8 once percent-decoded"),
    ],
)
def test_paths_the_app_could_resolve_differently_are_refused(target: bytes, message: str) -> None:
    assert refusal(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n") == (400, message)


def test_the_policy_judges_a_path_without_its_segments_parameters() -> None:
    """Servlet containers strip ``;parameters``: /public/secret;x is /public/secret to them,
    so a rule denying /public/secret must see it so; the app still gets the target as sent."""
    head = request(b"GET /public/secret;x/more;jsessionid=1?q=1 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert head is not None and head.path == "/public/secret/more"
    assert head.serialize().startswith(b"GET /public/secret;x/more;jsessionid=1?q=1 HTTP/1.1")


def test_a_trailing_slash_and_an_encoded_slash_inside_a_segment_are_fine() -> None:
    head = request(b"GET /api/a%2Fb/ HTTP/1.1\r\nHost: a\r\n\r\n")
    assert head is not None and head.path == "/api/a/b/"


def test_oversized_heads_are_refused_with_414_and_431() -> None:
    long_target = b"/" + b"a" * 9000
    assert refusal(b"GET " + long_target + b" HTTP/1.1\r\nHost: a\r\n\r\n") == (
        414, "the request line is longer than 8192 bytes")
    big = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"v" * 1000) for i in range(40))
    assert refusal(b"GET / HTTP/1.1\r\nHost: a\r\n" + big + b"\r\n") == (
        431, "the request headers are larger than 32768 bytes")
    many = b"".join(b"X-N%d: 1\r\n" % i for i in range(101))
    assert refusal(b"GET / HTTP/1.1\r\nHost: a\r\n" + many + b"\r\n") == (
        431, "the request headers are more than 100 fields")


def test_a_line_longer_than_the_reader_buffer_is_refused_too() -> None:
    huge = b"GET / HTTP/1.1\r\nHost: a\r\nX-Huge: " + b"v" * 70000 + b"\r\n\r\n"
    assert refusal(huge) == (431, "the request headers are larger than 32768 bytes")


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        (b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n", 400,
         "a request must not have both Content-Length and Transfer-Encoding"),
        (b"Transfer-Encoding: gzip, chunked\r\n", 501,
         "Transfer-Encoding gzip, chunked is not supported; only chunked is"),
        (b"Content-Length: 3\r\nContent-Length: 4\r\n", 400,
         "Content-Length must be one decimal number"),
        (b"Content-Length: -1\r\n", 400, "Content-Length must be one decimal number"),
        (b"Content-Length: 0x10\r\n", 400, "Content-Length must be one decimal number"),
    ],
)
def test_ambiguous_framing_is_refused(headers: bytes, status: int, message: str) -> None:
    data = b"POST / HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n"
    assert refusal(data) == (status, message)


def test_transfer_encoding_in_http_1_0_is_refused() -> None:
    assert refusal(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n") == (
        400, "Transfer-Encoding is not allowed in an HTTP/1.0 request")


# -- bodies --------------------------------------------------------------------------------


def test_a_chunked_body_is_passed_on_reframed_with_its_trailers() -> None:
    data = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Sum: 9\r\n\r\nNEXT"
    assert copied(data, Body(BodyKind.CHUNKED)) == (
        b"4\r\nWiki\r\n5\r\npedia\r\ne\r\n in\r\n\r\nchunks.\r\n0\r\nX-Sum: 9\r\n\r\n"
    )


def test_trailers_a_drop_rule_names_are_not_passed_on() -> None:
    data = (b"2\r\nhi\r\n0\r\nX_Forwarded_Client_Spiffe_Id: spiffe://example.org/admin\r\n"
            b"X-Sum: 9\r\n\r\n")
    assert copied(data, Body(BodyKind.CHUNKED),
                  drop_trailer=lambda name: name.lower().startswith("x_forwarded")) == (
        b"2\r\nhi\r\n0\r\nX-Sum: 9\r\n\r\n"
    )


def test_a_length_body_is_copied_exactly() -> None:
    assert copied(b"hello world", Body(BodyKind.LENGTH, 5)) == b"hello"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"zz\r\nab\r\n0\r\n\r\n", "a chunk size is not a hexadecimal number"),
        (b"2\r\nabX\r\n0\r\n\r\n", "a chunk's data is not followed by CRLF"),
        (b"5\r\nab", "the body ended 3 bytes before its Content-Length"),
        (b"2\r\nab", "the connection closed inside a chunked body"),
        (b"1" * 2000 + b"\r\n", "a chunk size line is longer than 1024 bytes"),
    ],
)
def test_malformed_chunked_bodies_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(HttpError) as caught:
        copied(data, Body(BodyKind.CHUNKED))
    assert (caught.value.status, caught.value.message) == (400, message)


def test_a_short_body_is_an_error_with_the_status_asked_for() -> None:
    with pytest.raises(HttpError) as caught:
        copied(b"abc", Body(BodyKind.LENGTH, 10), status=502)
    assert (caught.value.status, caught.value.message) == (
        502, "the body ended 7 bytes before its Content-Length")


# -- responses -----------------------------------------------------------------------------


def test_response_framing() -> None:
    def head(data: bytes, method: str = "GET") -> tuple[int, Body, bool]:
        response = run(data, lambda reader: read_response_head(reader, method))
        return response.status, response.body, response.keep_alive

    assert head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n") == (
        200, Body(BodyKind.LENGTH, 3), True)
    assert head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n") == (
        200, Body(BodyKind.CHUNKED), True)
    assert head(b"HTTP/1.1 200 OK\r\n\r\n") == (200, Body(BodyKind.UNTIL_CLOSE), False)
    assert head(b"HTTP/1.1 204 No Content\r\n\r\n") == (204, Body(BodyKind.NONE), True)
    assert head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", "HEAD") == (
        200, Body(BodyKind.NONE), True)
    assert head(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n") == (
        200, Body(BodyKind.LENGTH, 3), False)


def test_a_response_head_is_kept_as_sent() -> None:
    raw = b"HTTP/1.1 418 I'm a teapot\r\nX-A:b\r\nContent-Length: 0\r\n\r\n"
    response = run(raw + b"next", lambda reader: read_response_head(reader, "GET"))
    assert response.raw == raw


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "the app closed the connection without answering"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "the app did not answer with an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
         "Content-Length must be one decimal number"),
    ],
)
def test_a_broken_app_response_is_a_502(data: bytes, message: str) -> None:
    with pytest.raises(HttpError) as caught:
        run(data, lambda reader: read_response_head(reader, "GET"))
    assert (caught.value.status, caught.value.message) == (502, message)


def test_simple_response() -> None:
    assert simple_response(403, "no\n", keep_alive=True) == (
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 3\r\nConnection: keep-alive\r\n\r\nno\n"
    )
