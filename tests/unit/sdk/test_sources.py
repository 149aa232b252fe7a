"""Sources: static, files on disk, and the live Workload API."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import SpiffeId, TrustDomain, X509Svid

from sdk.authorize import authorize_id
from sdk.errors import SourceError
from sdk.sources import (
    FileX509Source,
    StaticX509Source,
    WorkloadApiJwtSource,
    WorkloadApiX509Source,
    workload_api_address,
)
from sdk.tls import mtls_client_context, mtls_server_context
from tests.support.pki import x509_svid_material
from tests.unit.sdk.conftest import (
    API_ID,
    DEADLINE_SECONDS,
    PARTNER_DOMAIN,
    TRUST_DOMAIN,
    WEB_ID,
    RunningWorkloadApi,
    TestCA,
    serial_of,
    wait_until,
)
from workload_api.identity import X509Context

# -- static -------------------------------------------------------------------------------


def test_a_static_source_notifies_its_subscribers(
    ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    source = StaticX509Source(ca.issue_x509_svid(WEB_ID), [ca.bundle()])
    calls: list[str] = []

    def broken() -> None:
        raise RuntimeError("boom")

    source.subscribe(broken)
    unsubscribe = source.subscribe(lambda: calls.append("first"))
    source.subscribe(lambda: calls.append("second"))
    rotated = ca.issue_x509_svid(WEB_ID)

    source.update(svid=rotated)
    unsubscribe()
    source.update(bundles=[])

    assert calls == ["first", "second", "second"]
    assert source.x509_svid() is rotated
    assert source.x509_bundles() == []
    assert [r.getMessage() for r in caplog.records] == ["a source subscriber failed"] * 2


# -- files --------------------------------------------------------------------------------


def write_svid(directory: Path, svid: X509Svid, bundle_ca: TestCA) -> None:
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.cert_chain)
    (directory / "svid.pem").write_bytes(chain)
    (directory / "svid.key").write_bytes(
        svid.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / "bundle.pem").write_bytes(
        bundle_ca.root.certificate.public_bytes(serialization.Encoding.PEM)
    )


def test_files_are_read_and_re_read_when_they_change(tmp_path: Path, ca: TestCA) -> None:
    first = ca.issue_x509_svid(WEB_ID)
    write_svid(tmp_path, first, ca)
    with FileX509Source(tmp_path, poll_interval=None) as source:
        changes: list[int] = []
        source.subscribe(lambda: changes.append(serial_of(source.x509_svid())))

        assert serial_of(source.x509_svid()) == serial_of(first)
        assert source.x509_bundle_for(TrustDomain(TRUST_DOMAIN)) == ca.bundle()
        assert source.refresh() is False  # nothing changed

        second = ca.issue_x509_svid(WEB_ID)
        write_svid(tmp_path, second, ca)
        assert source.refresh() is True

    assert changes == [serial_of(second)]


def test_a_half_written_set_of_files_is_skipped(
    tmp_path: Path, ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    first = ca.issue_x509_svid(WEB_ID)
    write_svid(tmp_path, first, ca)
    source = FileX509Source(tmp_path, poll_interval=None)
    key_before = (tmp_path / "svid.key").read_bytes()

    write_svid(tmp_path, ca.issue_x509_svid(WEB_ID), ca)
    (tmp_path / "svid.key").write_bytes(key_before)  # new certificate, old key

    assert source.refresh() is False
    assert serial_of(source.x509_svid()) == serial_of(first)
    assert [r.getMessage() for r in caplog.records] == [
        f"keeping the X509-SVID read before: the key in {tmp_path / 'svid.key'} does not "
        f"belong to the certificate in {tmp_path / 'svid.pem'} (files written at different "
        "times?)"
    ]


def test_federated_bundles_from_files(tmp_path: Path, ca: TestCA, partner_ca: TestCA) -> None:
    write_svid(tmp_path, ca.issue_x509_svid(WEB_ID), ca)
    partner = tmp_path / "partner.pem"
    partner.write_bytes(partner_ca.certificate.public_bytes(serialization.Encoding.PEM))

    source = FileX509Source(
        tmp_path, federated_bundles={PARTNER_DOMAIN: partner}, poll_interval=None
    )

    assert {b.trust_domain for b in source.x509_bundles()} == {
        TrustDomain(TRUST_DOMAIN),
        TrustDomain(PARTNER_DOMAIN),
    }


def test_the_poller_picks_up_a_change(tmp_path: Path, ca: TestCA) -> None:
    write_svid(tmp_path, ca.issue_x509_svid(WEB_ID), ca)
    changed = threading.Event()
    with FileX509Source(tmp_path, poll_interval=0.01) as source:
        source.subscribe(changed.set)
        second = ca.issue_x509_svid(WEB_ID)
        write_svid(tmp_path, second, ca)

        assert changed.wait(DEADLINE_SECONDS)
        assert serial_of(source.x509_svid()) == serial_of(second)


def test_missing_files(tmp_path: Path, ca: TestCA) -> None:
    write_svid(tmp_path, ca.issue_x509_svid(WEB_ID), ca)
    (tmp_path / "svid.key").unlink()

    with pytest.raises(SourceError) as refused:
        FileX509Source(tmp_path, poll_interval=None)

    assert str(refused.value) == f"cannot read {tmp_path / 'svid.key'}: No such file or directory"


def test_a_bundle_file_without_certificates(tmp_path: Path, ca: TestCA) -> None:
    write_svid(tmp_path, ca.issue_x509_svid(WEB_ID), ca)
    (tmp_path / "bundle.pem").write_text("")

    with pytest.raises(SourceError) as refused:
        FileX509Source(tmp_path, poll_interval=None)

    assert str(refused.value) == (
        f"{tmp_path / 'bundle.pem'} holds no PEM certificate; it should hold the CA "
        "certificates of trust domain example.org"
    )


# -- the Workload API ---------------------------------------------------------------------


def test_the_workload_api_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPIFFE_ENDPOINT_SOCKET", raising=False)
    with pytest.raises(SourceError) as refused:
        workload_api_address(None)
    assert str(refused.value) == (
        "no Workload API socket: pass socket_path or set SPIFFE_ENDPOINT_SOCKET, "
        "e.g. unix:///run/tessera/agent.sock"
    )

    assert workload_api_address("/run/agent.sock") == "unix:///run/agent.sock"
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", "unix:///var/agent.sock")
    assert workload_api_address(None) == "unix:///var/agent.sock"


def test_no_agent_on_the_socket(tmp_path: Path) -> None:
    missing = tmp_path / "agent.sock"

    with pytest.raises(SourceError) as refused:
        WorkloadApiX509Source(str(missing), timeout=DEADLINE_SECONDS)

    assert str(refused.value) == (
        f"cannot get an X509-SVID from the Workload API at unix://{missing}: Invalid "
        f'WorkloadApiClient configuration: SPIFFE socket file "{missing}" does not exist.'
    )


def test_the_workload_api_source_follows_the_agent(
    workload_api: RunningWorkloadApi, ca: TestCA, partner_ca: TestCA
) -> None:
    updated = threading.Event()
    with WorkloadApiX509Source(workload_api.address, timeout=DEADLINE_SECONDS) as source:
        source.subscribe(updated.set)
        assert source.x509_svid().spiffe_id == SpiffeId(WEB_ID)
        assert source.x509_bundle_for(TrustDomain(PARTNER_DOMAIN)) == partner_ca.bundle()
        assert len(source.x509_bundles()) == 2

        rotated = x509_svid_material(ca, WEB_ID)
        workload_api.replace(X509Context(svids=(rotated,), federated_bundles={}))

        assert updated.wait(DEADLINE_SECONDS)
        assert (
            source.x509_svid().cert_chain[0].public_bytes(serialization.Encoding.DER)
            == rotated.cert_chain_der
        )


def test_a_withdrawn_svid_is_kept_by_default_and_replaced_when_offered_again(
    workload_api: RunningWorkloadApi, ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    both = (x509_svid_material(ca, WEB_ID), x509_svid_material(ca, API_ID))
    workload_api.replace(X509Context(svids=both, federated_bundles={}))
    updates: list[str] = []
    with caplog.at_level(logging.INFO, logger="sdk.sources"), WorkloadApiX509Source(
        workload_api.address, spiffe_id=API_ID, timeout=DEADLINE_SECONDS, retry_seconds=0.2
    ) as source:
        held = source.x509_svid()
        assert held.spiffe_id == SpiffeId(API_ID)
        source.subscribe(lambda: updates.append("changed"))

        workload_api.replace(
            X509Context(svids=(x509_svid_material(ca, WEB_ID),), federated_bundles={})
        )
        wait_until(lambda: updates, "the update without the api SVID")
        assert source.x509_svid() is held
        assert len(source.x509_bundles()) == 1  # the update's bundles, with the SVID kept
        assert source.no_identity() is None  # it holds one
        not_offered = source.withdrawn()
        assert not_offered is not None and not_offered.startswith(
            f"the Workload API at {workload_api.address} no longer offers {API_ID}")

        withdraw(workload_api)  # PERMISSION_DENIED now: the same withdrawal, said anew
        wait_until(lambda: source.withdrawn() != not_offered, "the PERMISSION_DENIED")
        assert source.withdrawn() == (
            f"the Workload API at {workload_api.address} says this process has no identity "
            "(PERMISSION_DENIED): its registration entry was deleted or no longer matches it; "
            "keeping the SVID held until now, which expires at "
            f"{held.leaf.not_valid_after_utc}"
        )
        assert source.x509_svid() is held

        workload_api.replace(
            X509Context(svids=(x509_svid_material(ca, API_ID),), federated_bundles={})
        )
        wait_until(lambda: serial_of(source.x509_svid()) != serial_of(held), "the api SVID")
        assert source.withdrawn() is None

    assert _errors(caplog) == [
        f"the Workload API at {workload_api.address} no longer offers {API_ID} (it offers "
        f"{WEB_ID}); keeping the SVID held until now, which expires at "
        f"{held.leaf.not_valid_after_utc}"
    ]
    assert (f"the Workload API at {workload_api.address} issued an SVID for {API_ID} again; "
            "using it from now on") in caplog.text  # fmt: skip


def test_a_source_that_drops_withdrawn_svids_refuses_until_one_comes_back(
    workload_api: RunningWorkloadApi, ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    changes: list[str] = []
    with WorkloadApiX509Source(workload_api.address, timeout=DEADLINE_SECONDS,
                               drop_withdrawn=True, retry_seconds=0.2) as source:  # fmt: skip
        first = source.snapshot()
        assert first.svid.spiffe_id == SpiffeId(WEB_ID)
        assert [b.trust_domain.name for b in first.federated_bundles] == [PARTNER_DOMAIN]
        source.subscribe(lambda: changes.append("changed"))

        withdraw(workload_api)
        wait_until(lambda: source.no_identity() is not None, "the SVID being dropped")
        reason = (
            f"the Workload API at {workload_api.address} says this process has no identity "
            "(PERMISSION_DENIED): its registration entry was deleted or no longer matches it; "
            f"dropped the SVID of {WEB_ID} until one is issued again"
        )
        assert source.no_identity() == source.withdrawn() == reason
        for read in (source.x509_svid, source.x509_bundles, source.snapshot):
            with pytest.raises(SourceError) as refused:
                read()
            assert refused.value.message == reason
        assert changes == []  # nothing new to build

        workload_api.replace(
            X509Context(svids=(x509_svid_material(ca, WEB_ID),), federated_bundles={})
        )
        wait_until(lambda: source.no_identity() is None, "the SVID coming back")
        assert changes == ["changed"]
        assert serial_of(source.x509_svid()) != serial_of(first.svid)
        assert source.problem() is None

    assert _errors(caplog) == [reason]
    with pytest.raises(SourceError) as closed:
        source.x509_svid()
    assert closed.value.message == (
        f"the Workload API source for {workload_api.address} is closed"
    )


def test_a_spiffe_id_never_offered_is_refused_at_start(workload_api: RunningWorkloadApi) -> None:
    with pytest.raises(SourceError) as refused:
        WorkloadApiX509Source(workload_api.address, spiffe_id=API_ID, timeout=DEADLINE_SECONDS)

    assert refused.value.message == (
        f"the Workload API at {workload_api.address} offers no SVID for {API_ID} (it offers "
        f"{WEB_ID})"
    )


def withdraw(api: RunningWorkloadApi) -> None:
    """What the agent does once the workload's entry is deleted: PERMISSION_DENIED."""
    api.replace(X509Context(svids=(), federated_bundles={}))


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_tls_follows_a_rotation_served_by_the_workload_api(
    workload_api: RunningWorkloadApi, ca: TestCA, api_source: StaticX509Source
) -> None:
    """The agent rotates the client's SVID; the next handshake presents it."""
    server = mtls_server_context(api_source, authorize_id(WEB_ID))
    listener = socket.create_server(("127.0.0.1", 0))
    tls_listener = server.wrap_socket(listener, server_side=True)
    seen: list[int] = []

    def serve(count: int) -> None:
        for _ in range(count):
            connection, _ = tls_listener.accept()
            with connection:
                der = connection.getpeercert(binary_form=True)
                assert der is not None
                seen.append(_serial(der))
                connection.sendall(b"ok")

    thread = threading.Thread(target=serve, args=(2,), daemon=True)
    thread.start()
    updated = threading.Event()
    with WorkloadApiX509Source(workload_api.address, timeout=DEADLINE_SECONDS) as source:
        source.subscribe(updated.set)
        client = mtls_client_context(source, authorize_id(API_ID))
        first = serial_of(source.x509_svid())
        _talk(client, tls_listener.getsockname()[1])
        workload_api.replace(X509Context(svids=(x509_svid_material(ca, WEB_ID),),
                                         federated_bundles={}))  # fmt: skip
        assert updated.wait(DEADLINE_SECONDS)
        second = serial_of(source.x509_svid())
        _talk(client, tls_listener.getsockname()[1])
    thread.join(DEADLINE_SECONDS)
    tls_listener.close()

    assert seen == [first, second]
    assert first != second


def _talk(context: ssl.SSLContext, port: int) -> None:
    raw = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_SECONDS)
    with context.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.recv(2) == b"ok"


def _serial(der: bytes) -> int:
    return x509.load_der_x509_certificate(der).serial_number


def test_jwt_svids_from_the_workload_api(workload_api: RunningWorkloadApi) -> None:
    with WorkloadApiJwtSource(workload_api.address, timeout=DEADLINE_SECONDS) as source:
        svid = source.fetch_jwt_svid("spiffe://example.org/api")
        assert source.jwt_bundle_for(TrustDomain(TRUST_DOMAIN)) is not None
        assert source.jwt_bundle_for(TrustDomain(PARTNER_DOMAIN)) is None
        with pytest.raises(SourceError) as refused:
            source.fetch_jwt_svid([])

    assert (svid.spiffe_id, svid.audience) == (SpiffeId(WEB_ID), {"spiffe://example.org/api"})
    assert str(refused.value) == "a JWT-SVID needs at least one audience"
