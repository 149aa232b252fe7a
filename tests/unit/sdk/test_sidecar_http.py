"""The sidecar's HTTP/1.1 reader: what it accepts, what it refuses and with which status."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httptools
import pytest

from sdk.sidecar.errors import HttpError
from sdk.sidecar.http import (
    Body,
    BodyKind,
    RequestHead,
    ResponseHead,
    buffered_body,
    copy_body,
    read_request_head,
    read_response_head,
    simple_response,
)
from sdk.sidecar.http_exchange import reserved_identity_header
from sdk.sidecar.streams import BufferedReader

T = TypeVar("T")


def run(data: bytes, action: Callable[[BufferedReader], Awaitable[T]]) -> T:
    async def main() -> T:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await action(BufferedReader(reader))

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


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /a?b=c:d HTTP/1.1\r\nHost: users:80\r\nX-Empty:\r\nX-Blanks:   v  \t \r\n"
        b"Dup: 1\r\ndup: 2\r\nX-Colons: a:b: c\r\n\r\n",
        b"POST / HTTP/1.0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 5\r\nX-Tab:\tv\t\r\nE:\r\n\r\n",
    ],
)
def test_fields_are_taken_apart_as_llhttps_own_callbacks_report_them(raw: bytes) -> None:
    class Reported:  # what llhttp hands to Python field by field
        def __init__(self) -> None:
            self.fields: list[tuple[str, str]] = []

        def on_header(self, name: bytes, value: bytes) -> None:
            self.fields.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))

    reported = Reported()
    response = raw.startswith(b"HTTP/")
    parser = httptools.HttpResponseParser if response else httptools.HttpRequestParser
    parser(reported).feed_data(raw)
    head: RequestHead | ResponseHead | None = (
        run(raw, lambda reader: read_response_head(reader, "GET")) if response else request(raw)
    )
    assert head is not None
    assert head.headers == tuple(reported.fields)
    by_name: dict[str, list[str]] = {}
    for name, value in reported.fields:
        by_name.setdefault(name.lower(), []).append(value)
    assert head.by_name == by_name


def test_a_response_heads_fields_are_found_in_its_bytes_as_taking_it_apart_finds_them() -> None:
    raw = (b"HTTP/1.1 200 OK\r\nX-Count: 1\r\nContent-Length: 5\r\nx-count:  2 \r\n"
           b"X-Counted: no\r\nConnection: keep-alive, Upgrade\r\n\r\n")
    found = run(raw, lambda reader: read_response_head(reader, "GET"))
    looked_up = [found.values(name) for name in ("x-count", "X-COUNT", "connection", "absent")]
    assert looked_up == [["1", "2"], ["1", "2"], ["keep-alive, Upgrade"], []]
    assert found.body == Body(BodyKind.LENGTH, 5) and found.keep_alive
    assert found.headers[0] == ("X-Count", "1")  # taken apart now: the same answers
    assert [found.values(name) for name in ("x-count", "X-COUNT", "connection", "absent")] == (
        looked_up)
    assert found.without(["x-count", "connection"]) == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Counted: no\r\n\r\n")
    closing = run(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
                  lambda reader: read_response_head(reader, "GET"))
    assert not closing.keep_alive and closing.without(["connection"]) == closing.raw


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
    assert length is not None and length.body == Body(BodyKind.LENGTH, 12)
    assert chunked is not None and chunked.body == Body(BodyKind.CHUNKED)


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
        (b"GET / HTTP/2.0\r\n\r\n", 505, "HTTP/2.0 is not supported here; speak HTTP/1.1"),
        (b"CONNECT a:443 HTTP/1.1\r\n\r\n", 501, "CONNECT is not supported by this sidecar"),
        (b"GET http://a/x HTTP/1.1\r\nHost: a\r\n\r\n", 400,
         "send the request target as a path (origin-form), e.g. GET /items"),
        (b"GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n", 400,
         "the request target holds characters a URI may not"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, "an HTTP/1.1 request needs exactly one Host header"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400,
         "an HTTP/1.1 request needs exactly one Host header"),
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


# -- a head as it arrives ------------------------------------------------------------------


def unfinished(data: bytes) -> tuple[int, str]:
    """The refusal of ``data`` with the connection still open: it must come without waiting
    for more (the deadline only bounds a failing test)."""

    async def main() -> tuple[int, str]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        with pytest.raises(HttpError) as caught:
            async with asyncio.timeout(10):
                await read_request_head(BufferedReader(reader))
        return caught.value.status, caught.value.message

    return asyncio.run(main())


def test_a_head_arriving_a_byte_at_a_time_is_read_whole_and_what_follows_stays() -> None:
    data = b"\r\nPOST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhiGET"

    async def main() -> tuple[RequestHead | None, bytes, int]:
        reader = asyncio.StreamReader()
        stream = BufferedReader(reader)
        reading = asyncio.create_task(read_request_head(stream))
        for byte in data:
            reader.feed_data(bytes([byte]))
            await asyncio.sleep(0)  # let the reader look at what has arrived
        head = await reading
        return head, await stream.readexactly(2), stream.bytes_read

    head, body, read = asyncio.run(main())
    assert head is not None and (head.method, head.path) == ("POST", "/a")
    assert head.body == Body(BodyKind.LENGTH, 2) and body == b"hi"
    assert read == len(data) - len(b"GET")


def test_a_bad_request_line_is_refused_before_the_fields_arrive() -> None:
    assert unfinished(b"GET / HTTP/1.1 extra\r\nHost: a\r\n") == (
        400, "the request line must be METHOD SP TARGET SP HTTP-VERSION")
    assert unfinished(b"GET /" + b"a" * 9000) == (
        414, "the request line is longer than 8192 bytes")


def test_a_head_with_bare_lf_line_ends_is_refused_without_waiting_for_a_crlf() -> None:
    status, message = unfinished(b"GET / HTTP/1.1\nHost: a\n\n")
    assert status == 400 and message.startswith("the request is not valid HTTP/1.1")
    status, _ = unfinished(b"GET / HTTP/1.1\r\nHost: a\nX: 1\r\n\n")
    assert status == 400


def test_header_limits_hold_while_the_fields_are_still_arriving() -> None:
    start = b"GET / HTTP/1.1\r\nHost: a\r\n"
    assert unfinished(start + b"X-Huge: " + b"v" * 33000) == (
        431, "the request headers are larger than 32768 bytes")
    assert unfinished(start + b"".join(b"X-N%d: 1\r\n" % i for i in range(100))) == (
        431, "the request headers are more than 100 fields")


def test_a_small_body_that_has_arrived_is_taken_whole_and_a_partial_one_is_left() -> None:
    async def main() -> tuple[bytes | None, bytes | None, bytes | None, int]:
        reader = asyncio.StreamReader()
        reader.feed_data(b"0123456789")
        stream = BufferedReader(reader)
        await stream.fill()
        partial = buffered_body(stream, Body(BodyKind.LENGTH, 11))
        whole = buffered_body(stream, Body(BodyKind.LENGTH, 4))
        chunked = buffered_body(stream, Body(BodyKind.CHUNKED))
        return partial, whole, chunked, len(stream.buffer)

    assert asyncio.run(main()) == (None, b"0123", None, 6)


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        (b"Transfer-Encoding: gzip, chunked\r\n", 501,
         "Transfer-Encoding gzip, chunked is not supported; only chunked is"),
    ],
)
def test_ambiguous_framing_is_refused(headers: bytes, status: int, message: str) -> None:
    data = b"POST / HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n"
    assert refusal(data) == (status, message)


def test_transfer_encoding_in_http_1_0_is_refused() -> None:
    assert refusal(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n") == (
        400, "Transfer-Encoding is not allowed in an HTTP/1.0 request")


# -- what a request smuggler or a sloppy client sends --------------------------------------
#
# Each of these is refused, whichever parser reads it: the status is the contract
# (the message names what was wrong, in the parser's words).

SMUGGLED_OR_MALFORMED = {
    "Content-Length next to Transfer-Encoding": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        400),
    "Transfer-Encoding next to Content-Length": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        400),
    "two different Content-Lengths": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
    "two different lengths in one Content-Length": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\n", 400),
    "a negative Content-Length": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    "a hexadecimal Content-Length": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\n", 400),
    "a Content-Length with a sign": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n", 400),
    "an unsupported transfer coding before chunked": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    "Transfer-Encoding in HTTP/1.0": (
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n  folded\r\n\r\n", 400),
    "obs-fold with a tab": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\tfolded\r\n\r\n", 400),
    "obs-fold of Transfer-Encoding": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\nContent-Length: 3"
        b"\r\n\r\n", 400),
    "bare LF line ends": (b"GET / HTTP/1.1\nHost: a\n\n", 400),
    "a bare LF after one header": (b"GET / HTTP/1.1\r\nHost: a\nX-A: 1\r\n\r\n", 400),
    "a bare CR inside a value": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\rX-B: 2\r\n\r\n", 400),
    "whitespace before the colon": (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked"
                                    b"\r\n\r\n", 400),
    "a field without a colon": (b"GET / HTTP/1.1\r\nHost a\r\n\r\n", 400),
    "a control byte in a field name": (b"GET / HTTP/1.1\r\nHost: a\r\nX\x01A: 1\r\n\r\n", 400),
    "a space in a field name": (b"GET / HTTP/1.1\r\nHost: a\r\nX A: 1\r\n\r\n", 400),
    "NUL in a field value": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n", 400),
    "a method that is not a token": (b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "a version that is not HTTP/d.d": (b"GET / HTTP/x\r\nHost: a\r\n\r\n", 400),
    "HTTP/0.9 (no version)": (b"GET /\r\n\r\n", 400),
    "another protocol": (b"GET / RTSP/1.0\r\nHost: a\r\n\r\n", 400),
    "a control byte in the target": (b"GET /a\x01b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "a request line over 8 KiB": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    "a header section over 32 KiB": (
        b"GET / HTTP/1.1\r\nHost: a\r\n"
        + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"v" * 1000) for i in range(40)) + b"\r\n", 431),
    "one field longer than the reader's buffer": (
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Huge: " + b"v" * 70000 + b"\r\n\r\n", 431),
    "over 100 fields": (
        b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-N%d: 1\r\n" % i for i in range(101))
        + b"\r\n", 431),
}


@pytest.mark.parametrize(("data", "status"), SMUGGLED_OR_MALFORMED.values(),
                         ids=SMUGGLED_OR_MALFORMED.keys())  # fmt: skip
def test_smuggling_and_malformed_requests_are_refused(data: bytes, status: int) -> None:
    assert refusal(data)[0] == status


def test_a_content_length_listing_the_same_length_twice_is_refused_as_well() -> None:
    """RFC 9110 lets a recipient take ``3, 3`` as 3 or refuse it; llhttp refuses."""
    assert refusal(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\n")[0] == 400


@pytest.mark.parametrize("method", [b"G(T", b"MYMETHOD"])
def test_a_method_llhttp_does_not_know_is_refused(method: bytes) -> None:
    assert refusal(method + b" / HTTP/1.1\r\nHost: a\r\n\r\n") == (
        400,
        "the request method is not one llhttp knows (the registered HTTP and WebDAV methods "
        "and a few more)",
    )


@pytest.mark.parametrize("method", ["PATCH", "PROPFIND", "PURGE", "QUERY"])
def test_registered_and_webdav_methods_are_read(method: str) -> None:
    head = request(method.encode() + b" /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert head is not None and head.method == method


MALFORMED_CHUNKED_BODIES = {
    "a chunk size that is not hexadecimal": b"zz\r\nab\r\n0\r\n\r\n",
    "a negative chunk size": b"-2\r\nab\r\n0\r\n\r\n",
    "a chunk size with a 0x prefix": b"0x2\r\nab\r\n0\r\n\r\n",
    "an empty chunk size": b"\r\nab\r\n0\r\n\r\n",
    "a chunk size past 64 bits": b"1" * 40 + b"\r\nab\r\n0\r\n\r\n",
    "a chunk size line ended by a bare LF": b"2\nab\r\n0\r\n\r\n",
    "chunk data longer than its size": b"2\r\nabX\r\n0\r\n\r\n",
    "chunk data not followed by CRLF": b"2\r\nab\n\n0\r\n\r\n",
    "a chunk size line over 1 KiB": b"1" * 2000 + b"\r\n",
    "a chunk extension with a control byte": b"2;\x01\r\nab\r\n0\r\n\r\n",
    "the connection closed inside a chunk": b"5\r\nab",
    "the connection closed before the last chunk": b"2\r\nab\r\n",
    "obs-fold in the trailers": b"0\r\nX-A: 1\r\n folded\r\n\r\n",
}


@pytest.mark.parametrize("data", MALFORMED_CHUNKED_BODIES.values(),
                         ids=MALFORMED_CHUNKED_BODIES.keys())  # fmt: skip
def test_malformed_chunked_request_bodies_are_refused(data: bytes) -> None:
    with pytest.raises(HttpError) as caught:
        copied(data, Body(BodyKind.CHUNKED))
    assert caught.value.status == 400


def test_a_chunked_body_is_read_no_further_than_its_end() -> None:
    """What follows the body (the next request on the connection) stays unread."""

    async def copy_then_rest(reader: BufferedReader) -> bytes:
        await copy_body(reader, Collector(), Body(BodyKind.CHUNKED))
        return await reader.read()

    data = b"2\r\nhi\r\n0\r\nX-Sum: 9\r\n\r\nGET /next HTTP/1.1\r\n"
    assert run(data, copy_then_rest) == b"GET /next HTTP/1.1\r\n"


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
