"""grpcio over mTLS with credentials from a source: a tiny generic unary service."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc  # type: ignore[import-untyped]
import pytest

from sdk.authorize import authorize_id
from sdk.integrations.grpc import (
    AuthorizingInterceptor,
    RotatingChannel,
    caller_spiffe_id,
    channel_credentials,
    server_credentials,
)
from sdk.sources import StaticX509Source
from tests.unit.sdk.conftest import API_ID, DEADLINE_SECONDS, WEB_ID, TestCA

SERVER_NAME = "api.example.org"  # grpcio checks the server's DNS name, not its SPIFFE ID
OPTIONS = [("grpc.ssl_target_name_override", SERVER_NAME)]
METHOD = "/tessera.test.Echo/Echo"


def _echo(request: bytes, context: Any) -> bytes:
    return f"{caller_spiffe_id(context)} says {request.decode()}".encode()


@pytest.fixture
def api_svid_source(ca: TestCA, partner_ca: TestCA) -> StaticX509Source:
    return StaticX509Source(ca.issue_x509_svid(API_ID, dns_names=[SERVER_NAME]), [ca.bundle()])


@pytest.fixture
def grpc_server(api_svid_source: StaticX509Source) -> Iterator[int]:
    server = grpc.server(
        ThreadPoolExecutor(max_workers=2),
        interceptors=[AuthorizingInterceptor(authorize_id(WEB_ID))],
    )
    handler = grpc.method_handlers_generic_handler(
        "tessera.test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", server_credentials(api_svid_source))
    server.start()
    yield port
    server.stop(None)


def call(channel: Any, text: str) -> str:
    echo = channel.unary_unary(METHOD)
    answer: bytes = echo(text.encode(), timeout=DEADLINE_SECONDS)
    return answer.decode()


def test_an_mtls_call_names_the_caller(grpc_server: int, web_source: StaticX509Source) -> None:
    target = f"127.0.0.1:{grpc_server}"
    with grpc.secure_channel(target, channel_credentials(web_source), OPTIONS) as channel:
        assert call(channel, "hi") == f"{WEB_ID} says hi"


def test_a_caller_the_authorizer_refuses_gets_permission_denied(
    grpc_server: int, ca: TestCA
) -> None:
    intruder = StaticX509Source(ca.issue_x509_svid("spiffe://example.org/intruder"), [ca.bundle()])
    target = f"127.0.0.1:{grpc_server}"
    with (
        grpc.secure_channel(target, channel_credentials(intruder), OPTIONS) as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        call(channel, "hi")

    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.details() == (
        "spiffe://example.org/intruder refused by authorize_id: expected spiffe://example.org/web"
    )


def test_server_and_channel_follow_a_rotation_to_a_new_ca(
    grpc_server: int, ca: TestCA, api_svid_source: StaticX509Source, web_source: StaticX509Source
) -> None:
    channels = RotatingChannel(web_source, f"127.0.0.1:{grpc_server}", OPTIONS)
    try:
        before = channels.channel()
        assert call(before, "before") == f"{WEB_ID} says before"

        new_ca = TestCA(ca.trust_domain.name)  # the old CA is gone from every bundle
        api_svid_source.update(
            svid=new_ca.issue_x509_svid(API_ID, dns_names=[SERVER_NAME]), bundles=[new_ca.bundle()]
        )
        web_source.update(svid=new_ca.issue_x509_svid(WEB_ID), bundles=[new_ca.bundle()])
        after = channels.channel()

        assert after is not before
        assert call(after, "after") == f"{WEB_ID} says after"
    finally:
        channels.close()
