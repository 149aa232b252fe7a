"""HTTP/1.1 as the sidecar proxy reads it: request and response heads, and bodies by their framing.

::

    head = await read_request_head(client)        # None: the client closed between requests
    decision = policy.decide(peer_id, head.method, head.path)
    app.write(head.serialize(remove=reserved_identity_header, add=[...]))
    await copy_body(client, app, head.body)       # Content-Length or chunked
    response = await read_response_head(app, head.method)

Just enough of RFC 9112 for a proxy that judges every request by its method
and path, passes requests on re-serialised (so that what the app parses is
what the policy judged), and passes responses on as they came. What it
refuses, with the status an :class:`~sdk.sidecar.errors.HttpError` carries:

- a request line that is not ``METHOD SP /origin-form SP HTTP/1.x``: 400;
  longer than 8 KiB: 414; another major version: 505; ``CONNECT``: 501;
- a path that is not already normal once percent-decoded (``.``/``..``
  segments, ``//``, ``..;``): 400, since the app might resolve it otherwise than
  the policy did; the policy judges a path without its segments' ``;parameters``;
- a header section over 32 KiB or 100 fields: 431; line folding, whitespace
  before the colon, control bytes, lines not ended by CRLF: 400; an HTTP/1.1
  request without exactly one ``Host``: 400;
- ``Content-Length`` next to ``Transfer-Encoding``, several different
  ``Content-Length`` values, a malformed chunk: 400; a transfer coding other
  than ``chunked``: 501.

HTTP/2 and pipelining across an upgrade are not spoken; a ``101 Switching
Protocols`` answer turns the connection into a tunnel.
"""

from __future__ import annotations

import asyncio
import enum
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final, Protocol
from urllib.parse import unquote

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

_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET: Final = re.compile(rb"[\x21-\x7e]+")
_FIELD_VALUE_BAD: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_VERSION: Final = re.compile(rb"HTTP/(\d)\.(\d)")
_STATUS_LINE: Final = re.compile(rb"HTTP/(\d)\.(\d) (\d{3})(?: [\x09\x20-\x7e\x80-\xff]*)?")
_CHUNK_SIZE: Final = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DIGITS: Final = re.compile(r"\d{1,18}")


class ByteReader(Protocol):
    """What the parser reads from (``asyncio.StreamReader`` or a wrapper)."""

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


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str
    version: str
    headers: Headers
    body: Body
    path: str
    """The target's path, percent-decoded, without the query (what ASGI calls ``path``)."""

    def values(self, name: str) -> list[str]:
        return _values(self.headers, name)

    @property
    def keep_alive(self) -> bool:
        return _keep_alive(self.version, self.headers)

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


@dataclass(frozen=True)
class ResponseHead:
    status: int
    version: str
    headers: Headers
    body: Body
    raw: bytes
    """The head exactly as the app sent it (passed on unchanged)."""

    @property
    def keep_alive(self) -> bool:
        if self.body.kind is BodyKind.UNTIL_CLOSE:
            return False
        return _keep_alive(self.version, self.headers)


# -- requests ----------------------------------------------------------------------------


async def read_request_head(
    reader: ByteReader,
    *,
    max_request_line: int = MAX_REQUEST_LINE,
    max_header_bytes: int = MAX_HEADER_BYTES,
    max_fields: int = MAX_HEADER_FIELDS,
) -> RequestHead | None:
    """The next request's head; None if the connection ended cleanly before it."""
    too_long = HttpError(414, f"the request line is longer than {max_request_line} bytes")
    line: bytes | None = b""
    for _ in range(_EMPTY_LINES_BEFORE_REQUEST):
        line = await _read_line(reader, max_request_line, too_long, allow_eof=True)
        if line is None:
            return None
        if line:
            break
    if not line:
        raise HttpError(400, "expected a request line, got empty lines")
    method, target, version = _request_line(line)
    headers = await _read_fields(
        reader,
        budget=max_header_bytes,
        max_fields=max_fields,
        too_large=lambda what: HttpError(431, f"the request headers are {what}"),
        what="request",
    )
    if version == "HTTP/1.1" and len(_values(headers, "host")) != 1:
        raise HttpError(400, "an HTTP/1.1 request needs exactly one Host header")
    return RequestHead(
        method=method,
        target=target,
        version=version,
        headers=headers,
        body=_request_body(version, headers),
        path=_path(target),
    )


def _request_line(line: bytes) -> tuple[str, str, str]:
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "the request line must be METHOD SP TARGET SP HTTP-VERSION")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HttpError(400, "the request method is not a valid token")
    matched = _VERSION.fullmatch(version)
    if not matched:
        raise HttpError(400, "the request line does not end with an HTTP version such as HTTP/1.1")
    if matched.group(1) != b"1":
        raise HttpError(505, f"{version.decode()} is not supported here; speak HTTP/1.1")
    if method == b"CONNECT":
        raise HttpError(501, "CONNECT is not supported by this sidecar")
    if not _TARGET.fullmatch(target) or b"#" in target:
        raise HttpError(400, "the request target holds characters a URI may not")
    if not target.startswith(b"/") and not (target == b"*" and method == b"OPTIONS"):
        raise HttpError(400, "send the request target as a path (origin-form), e.g. GET /items")
    return method.decode(), target.decode(), version.decode()


def _path(target: str) -> str:
    if target == "*":
        return "*"
    try:
        path = unquote(target.partition("?")[0], errors="strict")
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


def _request_body(version: str, headers: Headers) -> Body:
    transfer_encodings = _values(headers, "transfer-encoding")
    lengths = _values(headers, "content-length")
    if transfer_encodings:
        if lengths:
            raise HttpError(
                400, "a request must not have both Content-Length and Transfer-Encoding"
            )
        if version == "HTTP/1.0":
            raise HttpError(400, "Transfer-Encoding is not allowed in an HTTP/1.0 request")
        codings = _tokens(transfer_encodings)
        if codings != ["chunked"]:
            raise HttpError(
                501, f"Transfer-Encoding {', '.join(codings)} is not supported; only chunked is"
            )
        return Body(BodyKind.CHUNKED)
    if lengths:
        return Body(BodyKind.LENGTH, _content_length(lengths, status=400))
    return NO_BODY


# -- responses ---------------------------------------------------------------------------


async def read_response_head(reader: ByteReader, request_method: str) -> ResponseHead:
    """The app's response head; HttpError(502) when it is not HTTP/1.x."""
    too_long = HttpError(502, "the app's status line is too long")
    line = await _read_line(reader, MAX_REQUEST_LINE, too_long, allow_eof=True, status=502)
    if line is None:
        raise HttpError(502, "the app closed the connection without answering")
    matched = _STATUS_LINE.fullmatch(line)
    if not matched or matched.group(1) != b"1":
        raise HttpError(502, "the app did not answer with an HTTP/1.x status line")
    status = int(matched.group(3))
    raw_lines: list[bytes] = [line]
    headers = await _read_fields(
        reader,
        budget=MAX_RESPONSE_HEADER_BYTES,
        max_fields=MAX_RESPONSE_HEADER_FIELDS,
        too_large=lambda what: HttpError(502, f"the app's response headers are {what}"),
        what="response",
        raw=raw_lines,
        status=502,
    )
    version = f"HTTP/1.{matched.group(2).decode()}"
    return ResponseHead(
        status=status,
        version=version,
        headers=headers,
        body=_response_body(request_method, status, headers),
        raw=b"".join(raw + b"\r\n" for raw in raw_lines) + b"\r\n",
    )


def _response_body(request_method: str, status: int, headers: Headers) -> Body:
    if request_method == "HEAD" or 100 <= status < 200 or status in (204, 304):
        return NO_BODY
    transfer_encodings = _values(headers, "transfer-encoding")
    if transfer_encodings:
        codings = _tokens(transfer_encodings)
        return Body(BodyKind.CHUNKED if codings[-1:] == ["chunked"] else BodyKind.UNTIL_CLOSE)
    lengths = _values(headers, "content-length")
    if lengths:
        return Body(BodyKind.LENGTH, _content_length(lengths, status=502))
    return Body(BodyKind.UNTIL_CLOSE)


def simple_response(status: int, text: str, *, keep_alive: bool) -> bytes:
    """A complete response with a short text body (the proxy's own answers: 403, 400, 502...)."""
    body = text.encode()
    reason = HTTPStatus(status).phrase
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n"
        "\r\n"
    )
    return head.encode() + body


# -- bodies ------------------------------------------------------------------------------


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


async def _copy_exactly(reader: ByteReader, writer: ByteWriter, length: int, status: int) -> None:
    remaining = length
    while remaining:
        data = await reader.read(min(remaining, COPY_BUFFER))
        if not data:
            raise HttpError(status, f"the body ended {remaining} bytes before its Content-Length")
        writer.write(data)
        remaining -= len(data)
        await writer.drain()


async def _copy_chunked(
    reader: ByteReader, writer: ByteWriter, status: int, drop_trailer: Callable[[str], bool]
) -> None:
    too_long = HttpError(status, f"a chunk size line is longer than {MAX_CHUNK_LINE} bytes")
    while True:
        line = await _read_line(reader, MAX_CHUNK_LINE, too_long, allow_eof=False, status=status)
        assert line is not None
        size_text = line.split(b";", 1)[0].strip(b" \t")
        if not _CHUNK_SIZE.fullmatch(size_text):
            raise HttpError(status, "a chunk size is not a hexadecimal number")
        size = int(size_text, 16)
        writer.write(b"%x\r\n" % size)
        if size == 0:
            break
        await _copy_exactly(reader, writer, size, status)
        try:
            end = await reader.readexactly(2)
        except asyncio.IncompleteReadError as err:
            raise HttpError(status, "the connection closed inside a chunked body") from err
        if end != b"\r\n":
            raise HttpError(status, "a chunk's data is not followed by CRLF")
        writer.write(b"\r\n")
        await writer.drain()
    trailer_lines: list[bytes] = []
    trailers_status = 431 if status == 400 else status
    trailers = await _read_fields(
        reader,
        budget=MAX_HEADER_BYTES,
        max_fields=MAX_HEADER_FIELDS,
        too_large=lambda what: HttpError(trailers_status, f"the trailers are {what}"),
        what="trailer",
        raw=trailer_lines,
        status=status,
    )
    kept = [line for (name, _), line in zip(trailers, trailer_lines, strict=True)
            if not drop_trailer(name)]
    writer.write(b"".join(line + b"\r\n" for line in kept) + b"\r\n")
    await writer.drain()


# -- lines and fields --------------------------------------------------------------------


async def _read_line(
    reader: ByteReader,
    limit: int,
    too_long: HttpError,
    *,
    allow_eof: bool,
    status: int = 400,
) -> bytes | None:
    """One CRLF-terminated line without its CRLF; None at a clean end if ``allow_eof``."""
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
    if not line.endswith(b"\r\n"):
        raise HttpError(status, "lines must end with CRLF")
    return line[:-2]


async def _read_fields(
    reader: ByteReader,
    *,
    budget: int,
    max_fields: int,
    too_large: _TooLarge,
    what: str,
    raw: list[bytes] | None = None,
    status: int = 400,
) -> Headers:
    fields: list[tuple[str, str]] = []
    used = 0
    while True:
        line = await _read_line(reader, budget, too_large(f"larger than {budget} bytes"),
                                allow_eof=False, status=status)  # fmt: skip
        assert line is not None
        if not line:
            return tuple(fields)
        used += len(line) + 2
        if used > budget:
            raise too_large(f"larger than {budget} bytes")
        if len(fields) >= max_fields:
            raise too_large(f"more than {max_fields} fields")
        fields.append(_field(line, what, status))
        if raw is not None:
            raw.append(line)


class _TooLarge(Protocol):
    def __call__(self, what: str) -> HttpError: ...


def _field(line: bytes, what: str, status: int) -> tuple[str, str]:
    if line[:1] in (b" ", b"\t"):
        raise HttpError(status, f"obsolete line folding in the {what} headers is not allowed")
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN.fullmatch(name):
        raise HttpError(status, f"a {what} header line is not NAME: VALUE")
    value = value.strip(b" \t")
    if _FIELD_VALUE_BAD.search(value):
        raise HttpError(status, f"the {what} header {name.decode()} holds a control character")
    return name.decode("latin-1"), value.decode("latin-1")


def _values(headers: Headers, name: str) -> list[str]:
    wanted = name.lower()
    return [value for field, value in headers if field.lower() == wanted]


def _tokens(values: Iterable[str]) -> list[str]:
    return [t.strip().lower() for value in values for t in value.split(",") if t.strip()]


def _keep_alive(version: str, headers: Headers) -> bool:
    tokens = _tokens(_values(headers, "connection"))
    if version == "HTTP/1.0":
        return "keep-alive" in tokens
    return "close" not in tokens


def _content_length(values: Iterable[str], *, status: int) -> int:
    found = {v.strip() for value in values for v in value.split(",")}
    if len(found) != 1 or not _DIGITS.fullmatch(next(iter(found))):
        raise HttpError(status, "Content-Length must be one decimal number")
    return int(found.pop())

