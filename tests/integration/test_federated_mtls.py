"""Workloads in two federated trust domains do mTLS with each other (SDK, real agents);
deleting the federation relationship makes it fail."""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sdk import (
    WorkloadApiX509Source,
    authorize_id,
    authorize_member_of,
    mtls_client_context,
    mtls_server_context,
)
from tests.integration.agent_fixtures import (  # noqa: F401  (fixtures)
    AgentProcess,
    socket_dir_fixture,
    start_agent_fixture,
)
from tests.integration.conftest import ServerProcess, free_port
from tests.integration.test_federation import (
    EXAMPLE_SERVER_ID,
    PARTNER_SERVER_ID,
    endpoint_config,
    federate,
    write_bundle,
)

pytestmark = pytest.mark.integration
CLIENT_ID = "spiffe://example.org/client"
SERVER_ID = "spiffe://partner.org/server"
DEADLINE = 30.0


class EchoServer:
    """A TLS echo server on a thread, with a context from the SDK."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(raw, server_side=True) as tls:
                    tls.sendall(tls.recv(1024))
            except (OSError, ssl.SSLError):
                pass

    def close(self) -> None:
        self.listener.close()


def call(context: ssl.SSLContext, port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw) as tls:
        tls.sendall(b"hello across trust domains")
        return tls.recv(1024)


@pytest.fixture
def sources(start_server: Any, start_agent: Any, tmp_path: Path,
            ) -> Iterator[tuple[ServerProcess, WorkloadApiX509Source, WorkloadApiX509Source]]:
    example_port, partner_port = free_port(), free_port()
    example: ServerProcess = start_server(
        "example", trust_domain="example.org",
        extra=endpoint_config(tmp_path, "example", example_port))
    partner: ServerProcess = start_server(
        "partner", trust_domain="partner.org",
        extra=endpoint_config(tmp_path, "partner", partner_port))
    federate(example, "partner.org", partner_port, PARTNER_SERVER_ID,
             write_bundle(partner, tmp_path / "partner.json"))
    federate(partner, "example.org", example_port, EXAMPLE_SERVER_ID,
             write_bundle(example, tmp_path / "example.json"))
    uid = f"unix:uid:{os.getuid()}"
    example_agent: AgentProcess = start_agent(example, alias="spiffe://example.org/node/a",
                                              name="example-agent")
    partner_agent: AgentProcess = start_agent(partner, alias="spiffe://partner.org/node/a",
                                              name="partner-agent")
    example.cli("entry", "create", "--parent-id", example_agent.alias, "--spiffe-id",
                CLIENT_ID, "--selector", uid, "--federates-with", "partner.org")
    partner.cli("entry", "create", "--parent-id", partner_agent.alias, "--spiffe-id",
                SERVER_ID, "--selector", uid, "--federates-with", "example.org")
    client = WorkloadApiX509Source(example_agent.endpoint)
    server = WorkloadApiX509Source(partner_agent.endpoint)
    try:
        yield partner, client, server
    finally:
        client.close()
        server.close()


def test_mtls_across_federated_trust_domains_until_the_relationship_goes(
    sources: tuple[ServerProcess, WorkloadApiX509Source, WorkloadApiX509Source],
) -> None:
    partner, client_source, server_source = sources
    echo = EchoServer(mtls_server_context(server_source, authorize_member_of("example.org")))
    client = mtls_client_context(client_source, authorize_id(SERVER_ID))
    try:
        deadline = time.monotonic() + DEADLINE
        while True:  # until each agent holds the other domain's bundle for its workload
            try:
                assert call(client, echo.port) == b"hello across trust domains"
                break
            except (OSError, ssl.SSLError):
                assert time.monotonic() < deadline, "mTLS across the trust domains never worked"
                time.sleep(0.2)

        partner.cli("federation", "delete", "--trust-domain", "example.org")
        deadline = time.monotonic() + DEADLINE
        while True:  # partner.org's workload stops trusting example.org
            try:
                call(client, echo.port)
            except (OSError, ssl.SSLError):
                break
            assert time.monotonic() < deadline, "mTLS still worked without federation"
            time.sleep(0.2)
    finally:
        echo.close()
