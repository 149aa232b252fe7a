"""HTTP/1.1 as the sidecar proxy reads it: request and response heads, and bodies by their framing.

::

    head = await read_request_head(client)        # None: the client closed between requests
    decision = policy.decide(peer_id, head.method, head.path)
    app.write(head.serialize(remove=reserved_identity_header, add=[...]))
    await copy_body(client, app, head.body)       # Content-Length or chunked
    response = await read_response_head(app, head.method)

The grammar of RFC 9112 is llhttp's (Node.js's parser, through ``httptools``,
uvicorn's fast path), in its strict mode. What stays Tessera's is the proxy's:
how much of a head is read at all (the limits below, counted while reading,
before a byte is parsed), what a path means to the policy, which framings are
passed on, and requests re-serialised (so that what the app parses is what
the policy judged) while responses go on as they came.

``h11`` was the other candidate. Parsing a typical request head, serialising
it again, decoding a chunked body of four 1 KiB chunks and parsing the
response head took 5.8 µs of CPU with ``httptools`` and 100 µs with ``h11``
(``python bench/http_parsers.py``); ``h11`` also accepts what the proxy must
refuse (obs-fold, bare LF line ends, ``Content-Length`` next to
``Transfer-Encoding``), which llhttp's strict mode refuses itself.

What is refused, with the status an :class:`~sdk.sidecar.errors.HttpError` carries:

- a request line that is not ``METHOD SP /origin-form SP HTTP/1.x``: 400;
  longer than 8 KiB: 414; HTTP/2.0: 505 (a version llhttp does not parse, e.g.
  HTTP/3.0: 400); ``CONNECT``: 501; a
  method outside llhttp's list (``GET``, ``PATCH``, ``PROPFIND``, ``PURGE``...:
  HTTP's, WebDAV's and a few more; not any token, as RFC 9110 would allow):
  400;
- a path that is not already normal once percent-decoded (``.``/``..``
  segments, ``//``, ``..;``): 400, since the app might resolve it otherwise than
  the policy did; the policy judges a path without its segments' ``;parameters``;
- a header section over 32 KiB or 100 fields: 431; what llhttp refuses (line
  folding, whitespace before the colon, control bytes, lines not ended by
  CRLF, an invalid token): 400; an HTTP/1.1 request without exactly one
  ``Host``: 400;
- ``Content-Length`` next to ``Transfer-Encoding``, more than one
  ``Content-Length``, a malformed chunk: 400; a transfer coding other than
  ``chunked``: 501.

HTTP/2 and pipelining across an upgrade are not spoken; a ``101 Switching
Protocols`` answer turns the connection into a tunnel.
"""

from __future__ import annotations

import asyncio
import enum
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from itertools import islice
from typing import Final, Protocol
from urllib.parse import unquote

import httptools

from sdk.sidecar.errors import HttpError

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_HEADER_FIELDS",
    "MAX_REQUEST_LINE",
    "Body",
    "BodyKind",
    "ByteReader",
    "ByteWriter",
    "RequestHead",
    "ResponseHead",
    "copy_body",
    "read_request_head",
    "read_response_head",
    "simple_response",
]

MAX_REQUEST_LINE: Final = 8 * 1024
MAX_HEADER_BYTES: Final = 32 * 1024
MAX_HEADER_FIELDS: Final = 100
MAX_RESPONSE_HEADER_BYTES: Final = 64 * 1024
MAX_RESPONSE_HEADER_FIELDS: Final = 200
MAX_CHUNK_LINE: Final = 1024
COPY_BUFFER: Final = 64 * 1024
_EMPTY_LINES_BEFORE_REQUEST: Final = 4
_LINE_ENDS: Final = (b"\r\n", b"\n")
_UNKNOWN_METHOD: Final = (
    "the request method is not one llhttp knows (the registered HTTP and WebDAV methods "
    "and a few more)"
)
_CHUNKED_REQUEST: Final = b"POST / HTTP/1.1\r\nHost: body\r\nTransfer-Encoding: chunked\r\n\r\n"
"""Primes a parser to read a bare chunked body (a request's or a response's: the same grammar)."""


class ByteReader(Protocol):
    """What the parser reads from: a :class:`~sdk.sidecar.streams.BufferedReader` (a
    :class:`~sdk.sidecar.streams.Stream` is one). A head is looked for in ``buffer``, whole,
    waiting (``fill``) only while it is incomplete."""

    @property
    def buffer(self) -> bytearray: ...

    async def fill(self) -> bool: ...

    def take(self, n: int) -> bytes: ...

    async def readuntil(self, separator: bytes) -> bytes: ...

    async def readexactly(self, n: int) -> bytes: ...

    async def read(self, n: int) -> bytes: ...


class ByteWriter(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...


class BodyKind(enum.Enum):
    NONE = "none"
    LENGTH = "length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until-close"
    """Responses only: the body ends when the app closes the connection."""


@dataclass(frozen=True)
class Body:
    kind: BodyKind
    length: int = 0


NO_BODY: Final = Body(BodyKind.NONE)

Headers = tuple[tuple[str, str], ...]
ByName = Mapping[str, list[str]]
"""A head's field values by lower-case name, in the order sent."""


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str
    version: str
    headers: Headers
    body: Body
    path: str
    """The target's path, percent-decoded, without the query (what ASGI calls ``path``)."""
    by_name: ByName = field(default_factory=dict, repr=False, compare=False)
    """``headers`` by lower-case name (the reader fills it; else :meth:`values` looks
    through ``headers``)."""

    def values(self, name: str) -> list[str]:
        return _values(self.headers, self.by_name, name)

    @property
    def keep_alive(self) -> bool:
        return _keep_alive(self.version, self.headers, self.by_name)

    @property
    def expects_continue(self) -> bool:
        return any(v.strip().lower() == "100-continue" for v in self.values("expect"))

    def serialize(
        self,
        *,
        remove: Callable[[str], bool] = lambda name: False,
        add: Sequence[tuple[str, str]] = (),
    ) -> bytes:
        """The head as it goes to the app: fields whose name ``remove`` accepts dropped (every
        one of them), ``add`` appended."""
        lines = [f"{self.method} {self.target} {self.version}"]
        lines += [f"{n}: {v}" for n, v in self.headers if not remove(n)]
        lines += [f"{n}: {v}" for n, v in add]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class ResponseHead:
    """A response head llhttp has accepted. Its status, version and framing are read at
    once; its fields are taken apart (:attr:`headers`, :attr:`by_name`) only when asked
    for: a proxy that passes the head on as it came needs only a few of them, which
    :meth:`values` finds in the head's bytes."""

    __slots__ = ("__dict__", "_fields", "_lowered", "body", "raw", "status", "version")

    def __init__(self, status: int, version: str, raw: bytes, request_method: str) -> None:
        self.status = status
        self.version = version
        self.raw = raw
        """The head exactly as the app sent it (passed on unchanged)."""
        self._lowered = raw.lower()
        self._fields: tuple[Headers, ByName] | None = None
        self.body = _response_body(request_method, status, self)

    def __repr__(self) -> str:
        return f"ResponseHead({self.status}, {self.version}, {self.raw!r})"

    @property
    def headers(self) -> Headers:
        return self._split()[0]

    @property
    def by_name(self) -> ByName:
        """``headers`` by lower-case name, as :attr:`RequestHead.by_name`."""
        return self._split()[1]

    def values(self, name: str) -> list[str]:
        """The values of the field ``name`` (any case), in the order sent."""
        if self._fields is not None:
            return list(self._fields[1].get(name.lower(), ()))
        raw, found = self.raw, []
        needle = b"\r\n" + name.lower().encode("latin-1") + b":"
        at = self._lowered.find(needle)
        while at >= 0:  # a field line (a value holds no CR or LF: llhttp saw to it)
            start = at + len(needle)
            end = raw.find(b"\r\n", start)
            found.append(raw[start:end].strip(b" \t").decode("latin-1"))
            at = self._lowered.find(needle, end)
        return found

    def without(self, names: Iterable[str]) -> bytes:
        """:attr:`raw` without the lines of the fields ``names`` (lower case)."""
        raw, lowered = self.raw, self._lowered
        cuts: list[tuple[int, int]] = []
        for name in names:
            needle = b"\r\n" + name.encode("latin-1") + b":"
            at = lowered.find(needle)
            while at >= 0:
                end = raw.find(b"\r\n", at + len(needle))
                cuts.append((at, end))  # its CRLF before it and the line: the next CRLF stays
                at = lowered.find(needle, end)
        if not cuts:
            return raw
        cuts.sort()
        kept, previous = bytearray(), 0
        for at, end in cuts:
            kept += raw[previous:at]
            previous = end
        kept += raw[previous:]
        return bytes(kept)

    @functools.cached_property
    def keep_alive(self) -> bool:
        if self.body.kind is BodyKind.UNTIL_CLOSE:
            return False
        tokens = _tokens(self.values("connection"))
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens

    def _split(self) -> tuple[Headers, ByName]:
        if self._fields is None:
            _, headers, by_name = _split_head(self.raw)
            self._fields = headers, by_name
        return self._fields


# -- requests ----------------------------------------------------------------------------


async def read_request_head(
    reader: ByteReader,
    *,
    max_request_line: int = MAX_REQUEST_LINE,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_fields: int = MAX_HEADER_FIELDS,
) -> RequestHead | None:
    """The next request's head; None if the connection ended cleanly before it."""

    def too_long() -> HttpError:
        return HttpError(414, f"the request line is longer than {max_request_line} bytes")

    found = await _read_head(
        reader,
        empty_lines=_EMPTY_LINES_BEFORE_REQUEST - 1,
        line_limit=max_request_line,
        line_too_long=too_long,
        check_line=_check_request_line,
        budget=max_header_bytes,
        max_fields=max_fields,
        too_large=_request_fields_too_large,
        status=400,
    )
    if found is None:
        return None
    parser = httptools.HttpRequestParser(_CHECK_ONLY)
    try:
        parser.feed_data(found)
    except httptools.HttpParserUpgrade:
        pass  # CONNECT, or a request asking to upgrade: its head is read all the same
    except httptools.HttpParserInvalidMethodError as err:
        raise HttpError(400, _UNKNOWN_METHOD) from err
    except httptools.HttpParserError as err:
        raise HttpError(400, f"the request is not valid HTTP/1.1: {_reason(err)}") from err
    request_line, headers, by_name = _split_head(found)
    method, target, _ = request_line.split(" ")  # three parts: _check_request_line saw to it
    version = f"HTTP/{parser.get_http_version()}"
    if not version.startswith("HTTP/1."):
        raise HttpError(505, f"{version} is not supported here; speak HTTP/1.1")
    if method == "CONNECT":
        raise HttpError(501, "CONNECT is not supported by this sidecar")
    if "#" in target:
        raise HttpError(400, "the request target holds characters a URI may not")
    if not target.startswith("/") and not (target == "*" and method == "OPTIONS"):
        raise HttpError(400, "send the request target as a path (origin-form), e.g. GET /items")
    if version == "HTTP/1.1" and len(by_name.get("host", ())) != 1:
        raise HttpError(400, "an HTTP/1.1 request needs exactly one Host header")
    return RequestHead(
        method=method,
        target=target,
        version=version,
        headers=headers,
        body=_request_body(version, by_name),
        path=_path(target),
        by_name=by_name,
    )


def _request_fields_too_large(what: str) -> HttpError:
    return HttpError(431, f"the request headers are {what}")


def _check_request_line(line: bytes) -> None:
    """What llhttp lets through but a request line sent to this proxy must not have (runs of
    spaces, no version: HTTP/0.9, another protocol than HTTP)."""
    parts = line.rstrip(b"\r\n").split(b" ")
    if len(parts) != 3 or not all(parts):
        raise HttpError(400, "the request line must be METHOD SP TARGET SP HTTP-VERSION")
    if not parts[2].startswith(b"HTTP/"):
        raise HttpError(400, "the request line does not end with an HTTP version such as HTTP/1.1")


def _path(target: str) -> str:
    if target == "*":
        return "*"
    path = target.partition("?")[0]
    if "%" not in path and ";" not in path and "/." not in path and "//" not in path:
        return path  # nothing to decode, no parameters, no dot or empty segments: as it is
    try:
        path = unquote(path, errors="strict")
    except UnicodeDecodeError as err:
        raise HttpError(400, "the request path is not UTF-8 once percent-decoded") from err
    # A segment's ;parameters are not part of its name to the servers that strip them
    # (servlet containers read "..;" as ".." and "secret;x" as "secret"): the policy
    # judges the names alone, and a name no server would take at its word is refused.
    names = [segment.partition(";")[0] for segment in path.split("/")[1:]]
    if any(s in (".", "..") for s in names) or "" in names[:-1]:
        raise HttpError(
            400,
            "the request path has '.' or '..' segments or an empty segment once decoded "
            "(path parameters after ';' aside); send it normalised",
        )
    return "/" + "/".join(names)


def _request_body(version: str, by_name: ByName) -> Body:
    # llhttp has refused Content-Length next to Transfer-Encoding, a repeated or
    # non-decimal Content-Length, and a Transfer-Encoding not ending in chunked.
    transfer_encodings = by_name.get("transfer-encoding")
    if transfer_encodings:
        if version == "HTTP/1.0":
            raise HttpError(400, "Transfer-Encoding is not allowed in an HTTP/1.0 request")
        codings = _tokens(transfer_encodings)
        if codings != ["chunked"]:
            raise HttpError(
                501, f"Transfer-Encoding {', '.join(codings)} is not supported; only chunked is"
            )
        return Body(BodyKind.CHUNKED)
    lengths = by_name.get("content-length")
    if lengths:
        return Body(BodyKind.LENGTH, int(lengths[0]))
    return NO_BODY


# -- responses ---------------------------------------------------------------------------


async def read_response_head(reader: ByteReader, request_method: str) -> ResponseHead:
    """The app's response head; HttpError(502) when it is not HTTP/1.x."""
    raw = await _read_head(
        reader,
        empty_lines=0,
        line_limit=MAX_REQUEST_LINE,
        line_too_long=_status_line_too_long,
        check_line=_check_status_line,
        budget=MAX_RESPONSE_HEADER_BYTES,
        max_fields=MAX_RESPONSE_HEADER_FIELDS,
        too_large=_response_fields_too_large,
        status=502,
    )
    if raw is None:
        raise HttpError(502, "the app closed the connection without answering")
    parser = httptools.HttpResponseParser(_CHECK_ONLY)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass  # 101 Switching Protocols
    except httptools.HttpParserError as err:
        raise HttpError(502, f"the app's response is not valid HTTP/1.1: {_reason(err)}") from err
    return ResponseHead(
        parser.get_status_code(), f"HTTP/{parser.get_http_version()}", raw, request_method
    )


def _status_line_too_long() -> HttpError:
    return HttpError(502, "the app's status line is too long")


def _check_status_line(line: bytes) -> None:
    if not line.startswith(b"HTTP/1."):
        raise HttpError(502, "the app did not answer with an HTTP/1.x status line")


def _response_fields_too_large(what: str) -> HttpError:
    return HttpError(502, f"the app's response headers are {what}")


def _response_body(request_method: str, status: int, head: ResponseHead) -> Body:
    if request_method == "HEAD" or 100 <= status < 200 or status in (204, 304):
        return NO_BODY
    transfer_encodings = head.values("transfer-encoding")
    if transfer_encodings:
        codings = _tokens(transfer_encodings)
        return Body(BodyKind.CHUNKED if codings[-1:] == ["chunked"] else BodyKind.UNTIL_CLOSE)
    lengths = head.values("content-length")
    if lengths:
        return Body(BodyKind.LENGTH, int(lengths[0]))
    return Body(BodyKind.UNTIL_CLOSE)


def simple_response(
    status: int, text: str, *, keep_alive: bool, headers: Sequence[tuple[str, str]] = ()
) -> bytes:
    """A complete response with a short text body (the proxy's own answers: 403, 400, 502...)."""
    body = text.encode()
    reason = HTTPStatus(status).phrase
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in headers)
        + "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n"
        "\r\n"
    )
    return head.encode() + body


# -- bodies ------------------------------------------------------------------------------


def buffered_body(reader: ByteReader, body: Body, *, limit: int = COPY_BUFFER) -> bytes | None:
    """A whole message body that has already arrived, consumed: ``b""`` for none, a
    ``Content-Length`` body of at most ``limit`` bytes if all of it is in ``reader``'s
    buffer; None otherwise (nothing consumed: :func:`copy_body` it).

    So that a small message goes on in one write (one TLS record, one ``send``) with its
    head: ``target.write(head + body)``.
    """
    if body.kind is BodyKind.NONE:
        return b""
    if body.kind is BodyKind.LENGTH and body.length <= min(limit, len(reader.buffer)):
        return reader.take(body.length)
    return None


async def copy_body(
    reader: ByteReader,
    writer: ByteWriter,
    body: Body,
    *,
    status: int = 400,
    drop_trailer: Callable[[str], bool] = lambda name: False,
) -> None:
    """Pass one message body on, re-framed as it was read; HttpError(``status``) if malformed.

    ``UNTIL_CLOSE`` copies until the reader's end. Chunk extensions are dropped;
    trailer fields are passed on, but for those whose name ``drop_trailer`` accepts
    (some servers merge trailers into the headers the app sees).
    """
    if body.kind is BodyKind.LENGTH:
        await _copy_exactly(reader, writer, body.length, status)
    elif body.kind is BodyKind.CHUNKED:
        await _copy_chunked(reader, writer, status, drop_trailer)
    elif body.kind is BodyKind.UNTIL_CLOSE:
        while data := await reader.read(COPY_BUFFER):
            writer.write(data)
            await writer.drain()


async def _copy_exactly(
    reader: ByteReader,
    writer: ByteWriter,
    length: int,
    status: int,
    parse: Callable[[bytes], None] | None = None,
) -> None:
    """Copy ``length`` bytes; through ``parse`` (which writes what it decodes) if given."""
    remaining = length
    while remaining:
        data = await reader.read(min(remaining, COPY_BUFFER))
        if not data:
            raise HttpError(status, f"the body ended {remaining} bytes before its Content-Length")
        if parse is None:
            writer.write(data)
        else:
            parse(data)
        remaining -= len(data)
        await writer.drain()


async def _copy_chunked(
    reader: ByteReader, writer: ByteWriter, status: int, drop_trailer: Callable[[str], bool]
) -> None:
    """llhttp checks every byte; Tessera reads no further than the body's end (the next
    request may follow it on the connection) and writes each chunk again without extensions."""
    message = _Message(on_body=writer.write)
    parser = httptools.HttpRequestParser(message)
    parser.feed_data(_CHUNKED_REQUEST)
    message.headers.clear()  # from here on, what on_header reports are the trailers

    def parse(data: bytes) -> None:
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as err:
            raise HttpError(status, f"the chunked body is malformed: {_reason(err)}") from err

    too_long = HttpError(status, f"a chunk size line is longer than {MAX_CHUNK_LINE} bytes")
    while True:
        line = await _read_line(reader, MAX_CHUNK_LINE, too_long, allow_eof=False, status=status)
        assert line is not None
        parse(line)  # refuses anything but HEXDIG+ [;extensions] CRLF
        size = int(line.partition(b";")[0].rstrip(b"\r\n"), 16)
        writer.write(b"%x\r\n" % size)
        if size == 0:
            break
        await _copy_exactly(reader, writer, size, status, parse)
        try:
            parse(await reader.readexactly(2))
        except asyncio.IncompleteReadError as err:
            raise HttpError(status, "the connection closed inside a chunked body") from err
        writer.write(b"\r\n")
        await writer.drain()
    trailers_status = 431 if status == 400 else status
    trailers = await _read_fields(
        reader,
        budget=MAX_HEADER_BYTES,
        max_fields=MAX_HEADER_FIELDS,
        too_large=lambda what: HttpError(trailers_status, f"the trailers are {what}"),
        status=status,
    )
    parse(trailers)
    if not message.complete:
        raise HttpError(status, "the chunked body did not end after its trailers")
    kept = [f"{name}: {value}\r\n" for name, value in message.headers if not drop_trailer(name)]
    writer.write("".join(kept).encode("latin-1") + b"\r\n")
    await writer.drain()


# -- lines and fields --------------------------------------------------------------------


class _Message:
    """What httptools reports of one message (its callbacks), field names as sent."""

    def __init__(self, on_body: Callable[[bytes], None] | None = None) -> None:
        self.headers: list[tuple[str, str]] = []
        self.by_name: dict[str, list[str]] = {}
        self.complete = False
        if on_body is not None:
            self.on_body = on_body

    def on_header(self, name: bytes, value: bytes) -> None:
        key, text = name.decode("latin-1"), value.strip(b" \t").decode("latin-1")
        self.headers.append((key, text))
        if (values := self.by_name.get(lowered := key.lower())) is None:
            self.by_name[lowered] = [text]
        else:
            values.append(text)

    def on_message_complete(self) -> None:
        self.complete = True


class _CheckOnly:
    """No callbacks: llhttp checks a whole head without calling into Python for each part
    of it (:func:`_split_head` takes the fields apart afterwards)."""


_CHECK_ONLY: Final = _CheckOnly()


def _split_head(raw: bytes) -> tuple[str, Headers, ByName]:
    """The start line and the fields of a head llhttp has accepted whole, with their names
    as sent and by lower-case name.

    Once llhttp has accepted it, the head is CRLF-ended lines with no folded line and no
    space before a field's colon, so a field is what comes before its first colon and a
    value what comes after, its surrounding blanks dropped: what llhttp's per-field
    callbacks report, for one ``decode`` and one ``split`` of the head rather than a
    call into Python and two decodes per field.
    """
    lines = raw.decode("latin-1").split("\r\n")
    del lines[-2:]  # the head ends in an empty line: "...\r\n\r\n"
    headers: list[tuple[str, str]] = []
    by_name: dict[str, list[str]] = {}
    for line in islice(lines, 1, None):
        name, _, value = line.partition(":")
        value = value.strip(" \t")
        headers.append((name, value))
        if (values := by_name.get(lowered := name.lower())) is None:
            by_name[lowered] = [value]
        else:
            values.append(value)
    return lines[0], tuple(headers), by_name


def _reason(err: Exception) -> str:
    return str(err) or type(err).__name__


async def _read_line(
    reader: ByteReader,
    limit: int,
    too_long: HttpError,
    *,
    allow_eof: bool,
    status: int = 400,
) -> bytes | None:
    """One line with its line end, at most ``limit`` bytes before it; None at a clean end if
    ``allow_eof``. Whether the line end is CRLF is llhttp's to judge."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError as err:
        raise too_long from err
    except asyncio.IncompleteReadError as err:
        if allow_eof and not err.partial:
            return None
        raise HttpError(status, "the connection closed in the middle of a line") from err
    if len(line) - 2 > limit:
        raise too_long
    return line


_CLOSED_IN_A_LINE: Final = "the connection closed in the middle of a line"


async def _read_head(
    reader: ByteReader,
    *,
    empty_lines: int,
    line_limit: int,
    line_too_long: Callable[[], HttpError],
    check_line: Callable[[bytes], None],
    budget: int,
    max_fields: int,
    too_large: _TooLarge,
    status: int,
) -> bytes | None:
    """A message head, whole (its start line, fields and empty line; up to ``empty_lines``
    CRLFs before it skipped), for the parser; None if the stream ended before a byte of it.

    It is looked for in what has arrived, and waited for only while incomplete; the limits
    hold while waiting (no more than the start line, ``budget`` bytes of fields and
    ``max_fields`` fields are ever buffered), and a start line ``check_line`` refuses is
    refused as soon as it is there. The head ends at the first empty line, CRLF or bare LF:
    a head with bare-LF line ends is then refused by the parser at once rather than waited
    on. ``status`` is that of the HttpError for a stream ending inside the head.
    """
    buffer = reader.buffer
    start = skipped = 0
    while True:  # the start line
        newline = buffer.find(b"\n", start)
        if newline < 0:
            if len(buffer) - start > line_limit + 1:
                raise line_too_long()
            if not await reader.fill():
                if start == len(buffer):
                    reader.take(start)
                    return None
                raise HttpError(status, _CLOSED_IN_A_LINE)
            continue
        if newline - start - 1 > line_limit:
            raise line_too_long()
        if newline == start + 1 and buffer[start] == 13 and empty_lines:  # CRLF
            skipped += 1
            if skipped > empty_lines:
                raise HttpError(400, "expected a request line, got empty lines")
            start = newline + 1
            continue
        break
    fields = newline + 1
    check_line(bytes(buffer[start:fields]))
    while (end := _fields_end(buffer, fields, budget, max_fields, too_large)) is None:
        if not await reader.fill():
            raise HttpError(status, _CLOSED_IN_A_LINE)
    if start:
        reader.take(start)
    return reader.take(end - start)


def _fields_end(
    buffer: bytearray, begin: int, budget: int, max_fields: int, too_large: _TooLarge
) -> int | None:
    """Where the field section starting at ``begin`` ends (after its empty line), None if it
    has not all arrived; too large (whole or as far as it has arrived): ``too_large``."""
    crlf = buffer.find(b"\n\r\n", begin - 1)
    lf = buffer.find(b"\n\n", begin - 1, crlf + 1 if crlf >= 0 else len(buffer))
    if lf >= 0:
        end: int | None = lf + 2
        size = lf + 1 - begin
    elif crlf >= 0:
        end, size = crlf + 3, crlf + 1 - begin
    else:
        end, size = None, len(buffer) - begin
    if size > budget or buffer.count(b"\n", begin, begin + size) > max_fields:
        _check_fields(buffer, begin, budget, max_fields, too_large)
    return end


def _check_fields(
    buffer: bytearray, begin: int, budget: int, max_fields: int, too_large: _TooLarge
) -> None:
    """Line by line, which limit the fields from ``begin`` break first (``too_large``); a
    field line not yet ended counts as far as it has arrived."""
    too_big = f"larger than {budget} bytes"
    used = count = 0
    position = begin
    while (newline := buffer.find(b"\n", position)) >= 0:
        size = newline + 1 - position
        if size - 2 > budget:
            raise too_large(too_big)
        if size == 1 or (size == 2 and buffer[position] == 13):
            return  # the empty line: the section ended within the limits
        used += size
        if used > budget:
            raise too_large(too_big)
        count += 1
        if count > max_fields:
            raise too_large(f"more than {max_fields} fields")
        position = newline + 1
    partial = len(buffer) - position
    if partial > budget + 1 or (partial > 1 and used + partial > budget):
        raise too_large(too_big)


async def _read_fields(
    reader: ByteReader,
    *,
    budget: int,
    max_fields: int,
    too_large: _TooLarge,
    status: int = 400,
) -> bytes:
    """A field section up to and with its empty line, unparsed: no more than ``budget`` bytes
    and ``max_fields`` lines are read."""
    lines: list[bytes] = []
    used = 0
    too_big = too_large(f"larger than {budget} bytes")
    while True:
        line = await _read_line(reader, budget, too_big, allow_eof=False, status=status)
        assert line is not None
        lines.append(line)
        if line in _LINE_ENDS:
            return b"".join(lines)
        used += len(line)
        if used > budget:
            raise too_big
        if len(lines) > max_fields:
            raise too_large(f"more than {max_fields} fields")


class _TooLarge(Protocol):
    def __call__(self, what: str) -> HttpError: ...


def _values(headers: Headers, by_name: ByName, name: str) -> list[str]:
    if by_name or not headers:
        return list(by_name.get(name.lower(), ()))
    wanted = name.lower()
    return [value for field, value in headers if field.lower() == wanted]


def _tokens(values: Iterable[str]) -> list[str]:
    return [t.strip().lower() for value in values for t in value.split(",") if t.strip()]


def _keep_alive(version: str, headers: Headers, by_name: ByName) -> bool:
    tokens = _tokens(_values(headers, by_name, "connection"))
    if version == "HTTP/1.0":
        return "keep-alive" in tokens
    return "close" not in tokens
