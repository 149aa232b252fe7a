"""The built-in proxy's routing decisions that need no socket: which Service a Host
calls, how a split divides requests, and which requests are tried again."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from dataplane.forwarding import (  # the heads' helpers too: their short paths
    Failure,
    _request_head,
    _response_head,
    choose_destination,
    may_repeat,
    retry_backoff,
    retry_wanted,
)
from dataplane.outbound import OutboundRoutes
from mesh import SidecarProxy, compile_view
from mesh.view import (
    Forward,
    HeaderOperations,
    HeaderRewrite,
    RetryPolicy,
    Source,
    WeightedDestination,
)
from sdk.sidecar.http import RequestHead, ResponseHead, read_request_head, read_response_head
from sdk.sidecar.streams import BufferedReader
from tests.unit.mesh.meshes import ORDERS, everything

SOURCE = Source("VirtualService", "test", "spec.http[0]")


def routes() -> OutboundRoutes:
    config, catalog = everything()
    return OutboundRoutes(compile_view(config, catalog, SidecarProxy("orders", ORDERS, {})))


@pytest.mark.parametrize("host", [
    "reviews", "reviews.default.svc", "reviews.default.svc.cluster.local", "reviews.anything",
])  # fmt: skip
def test_a_host_names_its_service_in_every_spelling_envoy_takes(host: str) -> None:
    service = routes().service_for(host)
    assert service is not None and service.service == "reviews"


@pytest.mark.parametrize("host", ["nothing-here", "api.example.com", "", "127.0.0.1"])
def test_a_host_naming_no_service_finds_none(host: str) -> None:
    table = routes()
    assert table.service_for(host) is None
    assert table.service_for(host) is None  # cached, the same answer


def test_the_split_of_the_view_divides_requests_by_weight() -> None:
    table = routes()
    reviews = table.service_for("reviews")
    assert reviews is not None
    action = reviews.routes[0].action
    assert isinstance(action, Forward)
    rng = random.Random(7)
    counts = Counter(choose_destination(action.destinations, rng).cluster  # type: ignore[union-attr]
                     for _ in range(10_000))  # fmt: skip
    assert set(counts) == {"outbound|9080|v1|reviews", "outbound|9080|v2|reviews"}
    # 90% of 10,000: one standard deviation is 30 requests.
    assert 8850 <= counts["outbound|9080|v1|reviews"] <= 9150, counts


def destination(subset: str, weight: int) -> WeightedDestination:
    return WeightedDestination("reviews", 9080, subset, weight, None, SOURCE)


def test_a_destination_of_weight_0_gets_nothing() -> None:
    rng = random.Random(1)
    destinations = (destination("v1", 0), destination("v2", 100), destination("v3", 0))
    assert {choose_destination(destinations, rng).subset  # type: ignore[union-attr]
            for _ in range(1000)} == {"v2"}  # fmt: skip
    assert choose_destination((destination("v1", 0),), rng) is None


def policy(*retry_on: str, codes: tuple[int, ...] = ()) -> RetryPolicy:
    return RetryPolicy(2, None, retry_on, codes, (), SOURCE)


@pytest.mark.parametrize(("retry_on", "status", "wanted"), [
    (("5xx",), 500, True),
    (("5xx",), 503, True),
    (("5xx",), 404, False),
    (("gateway-error",), 500, False),
    (("gateway-error",), 502, True),
    (("gateway-error",), 504, True),
    (("connect-failure",), 503, False),
    (("reset",), 503, False),
    (("retriable-4xx",), 409, True),
    (("retriable-4xx",), 400, False),
])  # fmt: skip
def test_a_status_is_retried_as_envoy_reads_retry_on(
    retry_on: tuple[str, ...], status: int, wanted: bool
) -> None:
    assert retry_wanted(policy(*retry_on), status=status) is wanted


def test_retriable_status_codes_retry_the_codes_given_only() -> None:
    istio = policy("connect-failure", "refused-stream", "unavailable", "cancelled",
                   "retriable-status-codes", codes=(503,))  # fmt: skip
    assert retry_wanted(istio, status=503)
    assert not retry_wanted(istio, status=500)
    assert not retry_wanted(policy("5xx", codes=(418,)), status=418)  # without the condition


def test_grpc_conditions_read_the_grpc_status() -> None:
    unavailable = policy("unavailable")
    fourteen = response_head(b"HTTP/1.1 200 OK\r\nGrpc-Status: 14\r\nContent-Length: 0\r\n\r\n")
    thirteen = response_head(b"HTTP/1.1 200 OK\r\ngrpc-status:13\r\nContent-Length: 0\r\n\r\n")
    assert retry_wanted(unavailable, status=200, grpc_status=fourteen.values)
    assert not retry_wanted(unavailable, status=200, grpc_status=thirteen.values)
    assert not retry_wanted(unavailable, status=200)


@pytest.mark.parametrize(("retry_on", "failure", "wanted"), [
    (("connect-failure",), Failure.CONNECT, True),
    (("connect-failure",), Failure.RESET, False),
    (("connect-failure",), Failure.TIMEOUT, False),
    (("5xx",), Failure.RESET, True),
    (("5xx",), Failure.TIMEOUT, True),
    (("gateway-error",), Failure.CONNECT, True),
    (("reset",), Failure.RESET, True),
    (("retriable-status-codes",), Failure.CONNECT, False),
    (("refused-stream",), Failure.RESET, False),
])  # fmt: skip
def test_a_failure_is_retried_as_envoy_reads_retry_on(
    retry_on: tuple[str, ...], failure: Failure, wanted: bool
) -> None:
    assert retry_wanted(policy(*retry_on), failure=failure) is wanted


@pytest.mark.parametrize(("method", "buffered", "failure", "repeat"), [
    ("POST", False, Failure.CONNECT, True),  # nothing reached the upstream
    ("GET", False, Failure.CONNECT, True),
    ("GET", True, None, True),  # a response: an idempotent method, its body held
    ("PUT", True, Failure.RESET, True),
    ("POST", True, None, False),  # not idempotent
    ("POST", True, Failure.RESET, False),
    ("GET", False, None, False),  # a streamed body went once
    ("PUT", False, Failure.TIMEOUT, False),
])  # fmt: skip
def test_only_what_is_safe_to_send_again_is(
    method: str, buffered: bool, failure: Failure | None, repeat: bool
) -> None:
    assert may_repeat(method, buffered=buffered, failure=failure) is repeat


def test_the_backoff_is_jittered_and_capped() -> None:
    rng = random.Random(3)
    first = [retry_backoff(1, rng) for _ in range(200)]
    assert all(0 <= wait < 0.025 for wait in first)
    assert max(first) > 0.02
    assert all(0 <= retry_backoff(10, rng) < 0.25 for _ in range(200))



# -- heads --------------------------------------------------------------------------------

NO_CHANGE = HeaderOperations(HeaderRewrite(), HeaderRewrite(), SOURCE)
"""Header operations that change nothing: the general path, to compare the short one with."""


def reader_of(data: bytes) -> BufferedReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return BufferedReader(reader)


def request_head(data: bytes) -> RequestHead:
    async def read() -> RequestHead | None:
        return await read_request_head(reader_of(data))

    head = asyncio.run(read())
    assert head is not None
    return head


@pytest.mark.parametrize("data", [
    b"GET /a?b=1 HTTP/1.1\r\nHost: users\r\nAccept: */*\r\nConnection: keep-alive\r\n"
    b"Traceparent: 00-x\r\nX-Request-Id: r1\r\n\r\n",
    b"POST /p HTTP/1.1\r\nhost: users\r\ncontent-length: 3\r\nTE: trailers\r\n\r\n",
    b"PUT /p HTTP/1.1\r\nHost: users\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
])  # fmt: skip
@pytest.mark.parametrize("body_length", [None, 3])
def test_a_request_head_without_header_operations_is_the_general_paths(
    data: bytes, body_length: int | None
) -> None:
    head = request_head(data)
    args = (head, "/x?y", "users:80")
    short = _request_head(*args, (), "00-t-s-01", body_length)
    assert short == _request_head(*args, (NO_CHANGE,), "00-t-s-01", body_length)
    assert short.startswith(b"GET /x?y HTTP/1.1\r\nhost: users:80\r\ntraceparent: 00-t-s-01\r\n"
                            .replace(b"GET", head.method.encode()))  # fmt: skip
    assert b"onnection" not in short and b"00-x" not in short


def response_head(data: bytes) -> ResponseHead:
    async def read() -> ResponseHead:
        return await read_response_head(reader_of(data), "GET")

    return asyncio.run(read())


def test_a_response_head_is_passed_on_as_sent_unless_something_changes() -> None:
    plain = response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A:  b\r\n\r\n")
    assert _response_head(plain, (), keep_alive=True) == plain.raw
    closing = _response_head(plain, (), keep_alive=False)
    assert closing == (  # the fields as sent, then the proxy's own
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A:  b\r\nconnection: close\r\n\r\n")
    several = response_head(b"HTTP/1.1 200 OK\r\nconnection: x-a\r\nContent-Length: 2\r\n"
                            b"Keep-Alive: timeout=5\r\nX-Connection: kept\r\n"
                            b"CONNECTION: keep-alive\r\nProxy-Connection: y\r\n\r\n")
    assert _response_head(several, (), keep_alive=False) == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Connection: kept\r\n"
        b"connection: close\r\n\r\n")
    hop = response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n")
    assert _response_head(hop, (), keep_alive=True) == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
    assert _response_head(plain, (NO_CHANGE,), keep_alive=True) == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\n")
