"""Which entries an agent may hold, and issuing SVIDs for them.

A real SQLite store, the memory key manager and a ManualClock; entries are
made with ``ca.entries.new_entry`` as the admin API makes them.
"""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi.responses import JSONResponse
from spiffe import SpiffeId

from attestor.selector import Selector
from ca.api.node import _compact_json, svid_json
from ca.authority import X509, Authorities, AuthorityPolicy
from ca.datastore import (
    AttestedAgent,
    AuditEvent,
    AuditNote,
    AuditVerification,
    Datastore,
    IssuedSvid,
    RegistrationEntry,
    as_new_entry,
)
from ca.entries import new_entry
from ca.issuance import IssuanceSettings, IssuedX509, Issuer, agent_or_refuse
from ca.keymanager import load_key_manager
from sdk.clock import ManualClock
from sdk.csr import build_csr
from sdk.errors import AlreadyExists, InvalidArgument, PermissionDenied, Unavailable
from sdk.keys import KeyType, PrivateKey, generate_private_key
from tests.unit.ca.conftest import START, TRUST_DOMAIN

SERVER = "spiffe://example.org/tessera/server"
AGENT = "spiffe://example.org/tessera/agent/join_token/one"
OTHER_AGENT = "spiffe://example.org/tessera/agent/join_token/two"
DEFAULT_X509_TTL = timedelta(hours=1)
DEFAULT_JWT_TTL = timedelta(minutes=5)


@pytest.fixture
def store(sqlite_url: str, clock: ManualClock) -> Iterator[Datastore]:
    with Datastore.open(sqlite_url, clock=clock) as opened:
        yield opened


@pytest.fixture
def authorities(store: Datastore, clock: ManualClock, tmp_path: Path) -> Authorities:
    policy = AuthorityPolicy(
        trust_domain=TRUST_DOMAIN, server_id="server-a", ca_ttl=timedelta(hours=24)
    )
    cas = Authorities(
        policy, store, load_key_manager("memory", {}, tmp_path), upstream=None, clock=clock
    )
    cas.rotate()
    return cas


@pytest.fixture
def issuer(store: Datastore, authorities: Authorities, clock: ManualClock) -> Issuer:
    settings = IssuanceSettings(
        trust_domain=TRUST_DOMAIN,
        default_x509_svid_ttl=DEFAULT_X509_TTL,
        default_jwt_svid_ttl=DEFAULT_JWT_TTL,
    )
    return Issuer(settings, store, authorities, clock)


def add_agent(
    store: Datastore, spiffe_id: str = AGENT, *, serial: str = "1f", selectors: tuple[str, ...] = ()
) -> AttestedAgent:
    return store.register_agent(
        spiffe_id,
        attestation_type="join_token",
        serial=serial,
        expires_at=START + timedelta(hours=1),
        selectors=tuple(Selector.parse(s) for s in selectors),
    )


@pytest.fixture
def agent(store: Datastore) -> AttestedAgent:
    return add_agent(store, selectors=("region:east", "tpm:pcr0:aa"))


@pytest.fixture
def other_agent(store: Datastore) -> AttestedAgent:
    return add_agent(store, OTHER_AGENT, selectors=("region:west",))


def add_entry(
    store: Datastore,
    spiffe_id: str,
    parent_id: str,
    selectors: tuple[str, ...] = ("unix:uid:1000",),
    **fields: object,
) -> RegistrationEntry:
    return store.create_entry(
        new_entry(
            TRUST_DOMAIN,
            spiffe_id=spiffe_id,
            parent_id=parent_id,
            selectors=selectors,
            **fields,  # type: ignore[arg-type]
        )
    )


def ids(entries: list[RegistrationEntry]) -> set[str]:
    return {entry.spiffe_id for entry in entries}


def csr_for(spiffe_id: str, dns_names: tuple[str, ...] = ()) -> tuple[bytes, PrivateKey]:
    key = generate_private_key(KeyType.EC_P256)
    return build_csr(key, SpiffeId(spiffe_id), dns_names), key


def issued_rows(sqlite_url: str) -> list[tuple[str, str, str, str]]:
    path = sqlite_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as connection:
        rows = connection.execute(
            "SELECT serial, spiffe_id, kind, agent_id FROM issued_svids ORDER BY serial"
        ).fetchall()
    connection.close()
    return rows


# -- authorized entries -----------------------------------------------------------------


def test_entries_parented_by_the_agent_itself(store, issuer, agent):
    add_entry(store, "spiffe://example.org/web", AGENT)

    assert ids(issuer.authorized_entries(agent)) == {"spiffe://example.org/web"}


def test_entries_parented_by_an_alias_of_the_agent(store, issuer, agent):
    store.add_agent_alias(AGENT, "spiffe://example.org/node/one")
    add_entry(store, "spiffe://example.org/web", "spiffe://example.org/node/one")

    assert ids(issuer.authorized_entries(agent)) == {"spiffe://example.org/web"}


def test_entries_parented_by_an_authorized_entry_are_authorized_transitively(
    store, issuer, agent
):
    store.add_agent_alias(AGENT, "spiffe://example.org/node/one")
    add_entry(store, "spiffe://example.org/proxy", "spiffe://example.org/node/one")
    add_entry(store, "spiffe://example.org/web", "spiffe://example.org/proxy")
    add_entry(store, "spiffe://example.org/web/admin", "spiffe://example.org/web")
    add_entry(store, "spiffe://example.org/elsewhere", "spiffe://example.org/unrelated")

    assert ids(issuer.authorized_entries(agent)) == {
        "spiffe://example.org/proxy",
        "spiffe://example.org/web",
        "spiffe://example.org/web/admin",
    }


def test_a_cycle_of_parents_terminates(store, issuer, agent):
    add_entry(store, "spiffe://example.org/a", AGENT)
    add_entry(store, "spiffe://example.org/b", "spiffe://example.org/a")
    add_entry(store, "spiffe://example.org/a", "spiffe://example.org/b")

    assert len(issuer.authorized_entries(agent)) == 3


def test_node_entries_match_the_agent_selectors(store, issuer, agent, other_agent):
    add_entry(store, "spiffe://example.org/cluster/east", SERVER, ("region:east",), node=True)
    add_entry(store, "spiffe://example.org/db", "spiffe://example.org/cluster/east")

    assert ids(issuer.authorized_entries(agent)) == {"spiffe://example.org/db"}
    assert issuer.authorized_entries(other_agent) == []


def test_a_node_entry_needs_all_its_selectors_on_the_agent(store, issuer, agent):
    add_entry(
        store, "spiffe://example.org/cluster/east", SERVER, ("region:east", "rack:r1"), node=True
    )
    add_entry(store, "spiffe://example.org/db", "spiffe://example.org/cluster/east")

    assert issuer.authorized_entries(agent) == []


def test_a_node_entry_under_another_parent_grants_nothing(store, issuer, agent):
    add_entry(
        store, "spiffe://example.org/cluster/east", "spiffe://example.org/x", ("region:east",),
        node=True,
    )
    add_entry(store, "spiffe://example.org/db", "spiffe://example.org/cluster/east")

    assert issuer.authorized_entries(agent) == []


def test_expired_entries_are_not_authorized(store, issuer, agent, clock):
    now = int(clock.now().timestamp())
    add_entry(store, "spiffe://example.org/gone", AGENT, expires_at=now - 1)
    add_entry(store, "spiffe://example.org/ending", AGENT, expires_at=now)
    add_entry(store, "spiffe://example.org/live", AGENT, expires_at=now + 60)

    assert ids(issuer.authorized_entries(agent)) == {"spiffe://example.org/live"}


def test_an_entry_stops_being_authorized_when_its_expiry_passes(store, issuer, agent, clock):
    now = int(clock.now().timestamp())
    add_entry(store, "spiffe://example.org/live", AGENT, expires_at=now + 60)
    assert ids(issuer.authorized_entries(agent)) == {"spiffe://example.org/live"}

    clock.advance(timedelta(minutes=2))  # nothing in the store changed, only the time

    assert issuer.authorized_entries(agent) == []


def test_other_agents_entries_are_not_authorized(store, issuer, agent, other_agent):
    store.add_agent_alias(OTHER_AGENT, "spiffe://example.org/node/two")
    add_entry(store, "spiffe://example.org/theirs", OTHER_AGENT)
    add_entry(store, "spiffe://example.org/theirs-too", "spiffe://example.org/node/two")
    add_entry(store, "spiffe://example.org/mine", AGENT)

    assert ids(issuer.authorized_entries(agent)) == {"spiffe://example.org/mine"}
    assert ids(issuer.authorized_entries(other_agent)) == {
        "spiffe://example.org/theirs",
        "spiffe://example.org/theirs-too",
    }


def test_authorized_entries_follow_changes_to_the_store(store, issuer, agent):
    first = add_entry(store, "spiffe://example.org/web", AGENT)
    assert ids(issuer.authorized_entries(agent)) == {"spiffe://example.org/web"}

    add_entry(store, "spiffe://example.org/db", AGENT)
    assert ids(issuer.authorized_entries(agent)) == {
        "spiffe://example.org/web",
        "spiffe://example.org/db",
    }

    store.delete_entry(first.id)
    assert ids(issuer.authorized_entries(agent)) == {"spiffe://example.org/db"}

    store.add_agent_alias(AGENT, "spiffe://example.org/node/one")
    add_entry(store, "spiffe://example.org/cache", "spiffe://example.org/node/one")
    assert ids(issuer.authorized_entries(agent)) == {
        "spiffe://example.org/db",
        "spiffe://example.org/cache",
    }


def test_authorized_entries_are_cached_while_the_revision_stands(store, issuer, agent):
    add_entry(store, "spiffe://example.org/web", AGENT)
    first = issuer.authorized_entries(agent)

    assert issuer.authorized_entries(agent) is first


# -- X509-SVIDs in batches --------------------------------------------------------------


def test_a_good_batch_records_one_issued_svid_per_csr(store, issuer, agent, sqlite_url):
    web = add_entry(store, "spiffe://example.org/web", AGENT, dns_names=["web.example.org"])
    db = add_entry(store, "spiffe://example.org/db", AGENT)
    web_csr, web_key = csr_for(web.spiffe_id, ("web.example.org",))
    db_csr, db_key = csr_for(db.spiffe_id)

    issued = issuer.sign_batch(agent, [(web.id, web_csr), (db.id, db_csr)])

    assert [svid.entry_id for svid in issued] == [web.id, db.id]
    assert [str(svid.spiffe_id) for svid in issued] == [web.spiffe_id, db.spiffe_id]
    assert issued[0].leaf.public_key() == web_key.public_key()
    assert issued[1].leaf.public_key() == db_key.public_key()
    san = issued[0].leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["web.example.org"]
    assert store.count_issued_svids() == 2
    assert issued_rows(sqlite_url) == sorted(
        (format(svid.leaf.serial_number, "x"), str(svid.spiffe_id), "x509", AGENT)
        for svid in issued
    )


def test_a_batch_keeps_each_leaf_as_signed_and_parses_it_only_when_asked(
    store, issuer, agent, authorities, monkeypatch
):
    web = add_entry(store, "spiffe://example.org/web", AGENT)
    csr, key = csr_for(web.spiffe_id)
    authority = authorities.active(X509).certificate  # loaded (parsed) once, before
    parsed: list[bytes] = []
    load = x509.load_der_x509_certificate

    def counting_load(data: bytes) -> x509.Certificate:
        parsed.append(data)
        return load(data)

    monkeypatch.setattr(x509, "load_der_x509_certificate", counting_load)

    [issued] = issuer.sign_batch(agent, [(web.id, csr)])
    answer = svid_json(issued)

    assert parsed == []  # signing, recording and answering never parse the leaf
    assert issued.chain_der() == [issued.leaf_der]
    assert issued.chain_der()[0] is issued.leaf_der  # kept, not encoded again
    assert answer == {
        "entry_id": web.id,
        "spiffe_id": web.spiffe_id,
        "cert_chain": [base64.b64encode(issued.leaf_der).decode()],
        "expires_at": int((START + DEFAULT_X509_TTL).timestamp()),
    }
    leaf = issued.leaf
    assert issued.leaf is leaf
    assert parsed == [issued.leaf_der]  # once, on first use
    assert leaf.public_key() == key.public_key()
    assert leaf.serial_number == issued.serial_number
    assert leaf.not_valid_after_utc == issued.expires_at == START + DEFAULT_X509_TTL
    leaf.verify_directly_issued_by(authority)
    assert store.count_issued_svids() == 1


def test_an_issued_svid_made_from_a_certificate_answers_the_same(issuer, authorities):
    issued, _ = issuer.mint_x509("spiffe://example.org/tool", ttl=None)
    intermediate = authorities.active(X509).certificate
    from_certificate = IssuedX509(issued.spiffe_id, issued.leaf, (intermediate,), "e1")

    assert from_certificate.leaf_der == issued.leaf_der
    assert from_certificate.serial_number == issued.serial_number
    assert from_certificate.expires_at == issued.expires_at == START + DEFAULT_X509_TTL
    assert from_certificate.chain_der() == [
        issued.leaf_der,
        intermediate.public_bytes(serialization.Encoding.DER),
    ]
    assert svid_json(from_certificate)["cert_chain"] == [
        base64.b64encode(der).decode() for der in from_certificate.chain_der()
    ]
    assert from_certificate.chain_pem() == b"".join(
        c.public_bytes(serialization.Encoding.PEM) for c in (issued.leaf, intermediate)
    )


def test_entry_ttl_is_honoured_and_the_default_used_otherwise(store, issuer, agent, clock):
    custom = add_entry(store, "spiffe://example.org/short", AGENT, x509_svid_ttl=600)
    default = add_entry(store, "spiffe://example.org/default", AGENT)

    short, standard = issuer.sign_batch(
        agent,
        [(custom.id, csr_for(custom.spiffe_id)[0]), (default.id, csr_for(default.spiffe_id)[0])],
    )

    assert short.expires_at == clock.now() + timedelta(seconds=600)
    assert standard.expires_at == clock.now() + DEFAULT_X509_TTL


def test_an_unauthorized_entry_is_refused_and_nothing_is_signed(
    store, issuer, agent, other_agent
):
    mine = add_entry(store, "spiffe://example.org/mine", AGENT)
    theirs = add_entry(store, "spiffe://example.org/theirs", OTHER_AGENT)

    with pytest.raises(PermissionDenied) as refused:
        issuer.sign_batch(
            agent,
            [(mine.id, csr_for(mine.spiffe_id)[0]), (theirs.id, csr_for(theirs.spiffe_id)[0])],
        )

    assert refused.value.message == f"entry {theirs.id} is not authorized for agent {AGENT}"
    assert store.count_issued_svids() == 0


def test_an_unknown_entry_is_refused_like_an_unauthorized_one(store, issuer, agent):
    with pytest.raises(PermissionDenied) as refused:
        issuer.sign_batch(agent, [("no-such-entry", csr_for("spiffe://example.org/x")[0])])

    assert refused.value.message == f"entry no-such-entry is not authorized for agent {AGENT}"


def test_a_garbage_csr_is_refused_naming_its_index(store, issuer, agent):
    web = add_entry(store, "spiffe://example.org/web", AGENT)
    db = add_entry(store, "spiffe://example.org/db", AGENT)

    with pytest.raises(InvalidArgument) as refused:
        issuer.sign_batch(agent, [(web.id, csr_for(web.spiffe_id)[0]), (db.id, b"not a csr")])

    assert refused.value.message == (
        f"CSR 1 (entry {db.id}): CSR is not a valid PKCS#10 request in DER or PEM"
    )
    assert store.count_issued_svids() == 0


def test_a_csr_for_another_spiffe_id_is_refused(store, issuer, agent):
    web = add_entry(store, "spiffe://example.org/web", AGENT)
    add_entry(store, "spiffe://example.org/admin", AGENT)

    with pytest.raises(InvalidArgument) as refused:
        issuer.sign_batch(agent, [(web.id, csr_for("spiffe://example.org/admin")[0])])

    assert refused.value.message == (
        f"CSR 0 (entry {web.id}): CSR URI SANs ['spiffe://example.org/admin'] do not match "
        "the SPIFFE ID spiffe://example.org/web; a CSR may name only the SPIFFE ID of the "
        "entry it is for"
    )
    assert store.count_issued_svids() == 0


def test_a_csr_asking_for_a_dns_name_the_entry_lacks_is_refused(store, issuer, agent):
    web = add_entry(store, "spiffe://example.org/web", AGENT)

    with pytest.raises(InvalidArgument, match=r"^CSR 0 .*evil\.example\.org"):
        issuer.sign_batch(agent, [(web.id, csr_for(web.spiffe_id, ("evil.example.org",))[0])])
    assert store.count_issued_svids() == 0


def test_the_batch_answer_is_encoded_as_fastapi_encodes_a_dict(store, issuer, agent):
    web = add_entry(store, "spiffe://example.org/web", AGENT)
    [issued] = issuer.sign_batch(agent, [(web.id, csr_for(web.spiffe_id)[0])])
    answer = {"svids": [svid_json(issued)], "note": "é"}

    assert _compact_json(answer) == JSONResponse(answer).body


def test_an_oversized_batch_is_refused(store, issuer, agent):
    with pytest.raises(InvalidArgument) as refused:
        issuer.sign_batch(agent, [("x", b"")] * 501)

    assert refused.value.message == "a batch takes at most 500 CSRs; split it"


# -- every issuance is in the audit log --------------------------------------------------


def test_a_batch_is_one_audit_event_naming_every_svid(store, issuer, agent, authorities):
    web = add_entry(store, "spiffe://example.org/web", AGENT)
    db = add_entry(store, "spiffe://example.org/db", AGENT)

    issued = issuer.sign_batch(
        agent, [(web.id, csr_for(web.spiffe_id)[0]), (db.id, csr_for(db.spiffe_id)[0])]
    )

    [event] = store.list_audit()
    assert (event.actor, event.action, event.target) == (AGENT, "x509svid.issue", AGENT)
    authority = authorities.active(X509).record.authority_id
    assert event.details == {"svids": [
        {"serial": format(svid.serial_number, "x"), "spiffe_id": str(svid.spiffe_id),
         "entry_id": svid.entry_id, "authority_id": authority,
         "expires_at": svid.expires_at.isoformat()}
        for svid in issued
    ]}  # fmt: skip
    assert store.verify_audit().problem is None


def test_an_agent_svid_and_a_workload_jwt_svid_are_audited(store, issuer, agent, authorities):
    web = add_entry(store, "spiffe://example.org/web", AGENT)
    agent_key = generate_private_key(KeyType.EC_P256)

    renewed = issuer.sign_agent_svid(SpiffeId(AGENT), build_csr(agent_key, SpiffeId(AGENT)))
    issuer.jwt_for_agent(agent, web.id, ["db"])

    jwt_event, svid_event = store.list_audit()
    assert (svid_event.actor, svid_event.action, svid_event.target) == (
        AGENT, "agent.svid.issue", AGENT)  # fmt: skip
    assert svid_event.details["serial"] == format(renewed.serial_number, "x")
    assert (jwt_event.actor, jwt_event.action, jwt_event.target) == (
        AGENT, "jwtsvid.issue", web.spiffe_id)  # fmt: skip
    assert jwt_event.details["audience"] == ["db"]
    assert jwt_event.details["authority_id"] == authorities.active("jwt").record.authority_id


# -- minting ----------------------------------------------------------------------------


def test_mint_x509_records_the_svid_and_audits_it(store, issuer):
    issued, key = issuer.mint_x509("spiffe://example.org/tool", ttl=None)

    assert str(issued.spiffe_id) == "spiffe://example.org/tool"
    assert issued.leaf.public_key() == key.public_key()
    assert store.count_issued_svids() == 1
    assert [(e.actor, e.action, e.target) for e in store.list_audit()] == [
        ("admin", "x509.mint", "spiffe://example.org/tool")
    ]


def test_mint_x509_refuses_another_trust_domain(issuer, store):
    with pytest.raises(InvalidArgument) as refused:
        issuer.mint_x509("spiffe://other.org/tool", ttl=None)

    assert refused.value.message == (
        "SPIFFE ID spiffe://other.org/tool is not in trust domain example.org; "
        "use an ID of the form spiffe://example.org/..."
    )
    assert store.count_issued_svids() == 0


def test_mint_jwt_needs_an_audience(issuer):
    for audience in ([], [""]):
        with pytest.raises(InvalidArgument) as refused:
            issuer.mint_jwt("spiffe://example.org/tool", audience, ttl=None)
        assert refused.value.message == "at least one audience is required, e.g. --audience db"


def test_mint_jwt_signs_with_the_active_jwt_authority(issuer, authorities, clock):
    token, expires_at = issuer.mint_jwt("spiffe://example.org/tool", ["db"], ttl=None)

    assert expires_at == clock.now() + DEFAULT_JWT_TTL
    header = jwt.get_unverified_header(token)
    assert header["kid"] == authorities.active("jwt").record.authority_id
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "spiffe://example.org/tool"
    assert claims["aud"] in ("db", ["db"])


def test_jwt_for_agent_uses_the_entry_ttl_and_checks_authorization(
    store, issuer, agent, other_agent, clock
):
    web = add_entry(store, "spiffe://example.org/web", AGENT, jwt_svid_ttl=120)

    spiffe_id, _token, expires_at = issuer.jwt_for_agent(agent, web.id, ["db"])

    assert spiffe_id == web.spiffe_id
    assert expires_at == clock.now() + timedelta(seconds=120)
    with pytest.raises(PermissionDenied) as refused:
        issuer.jwt_for_agent(other_agent, web.id, ["db"])
    assert refused.value.message == f"entry {web.id} is not authorized for agent {OTHER_AGENT}"


# -- the agent presenting an SVID -------------------------------------------------------


def test_agent_or_refuse_returns_the_current_agent(store, agent):
    assert agent_or_refuse(store, SpiffeId(AGENT), 0x1F) == agent


def test_agent_or_refuse_refuses_an_unknown_agent(store):
    with pytest.raises(PermissionDenied) as refused:
        agent_or_refuse(store, SpiffeId(AGENT), 0x1F)

    assert refused.value.message == f"{AGENT} is not an attested agent; it must attest again"


def test_agent_or_refuse_refuses_a_banned_agent(store, agent):
    store.set_agent_banned(AGENT, True)

    with pytest.raises(PermissionDenied) as refused:
        agent_or_refuse(store, SpiffeId(AGENT), 0x1F)

    assert refused.value.message == f"agent {AGENT} is banned"


def test_the_svid_before_a_renewal_works_until_the_renewed_one_is_used(store, agent):
    store.update_agent_serial(AGENT, "20", START + timedelta(hours=2))
    # The renewal's answer may have been lost: the old SVID still works...
    assert agent_or_refuse(store, SpiffeId(AGENT), 0x1F).serial == "20"
    assert agent_or_refuse(store, SpiffeId(AGENT), 0x1F).serial == "20"
    # ...until the agent presents the renewed one.
    assert agent_or_refuse(store, SpiffeId(AGENT), 0x20).previous_serial == "1f"
    assert store.get_agent(AGENT).previous_serial == ""


def test_agent_or_refuse_refuses_a_stale_svid(store, agent):
    store.update_agent_serial(AGENT, "20", START + timedelta(hours=2))
    agent_or_refuse(store, SpiffeId(AGENT), 0x20)  # the renewed SVID is in use

    with pytest.raises(PermissionDenied) as refused:
        agent_or_refuse(store, SpiffeId(AGENT), 0x1F)

    assert refused.value.message == (
        f"agent {AGENT} presented an SVID that is no longer its current one"
    )


# -- batches signed at the same moment are recorded together -----------------------------
#
# The first batch's write is held inside the store until the others have queued behind it
# (polled with a deadline; nothing sleeps for time), then released.

DEADLINE = 10.0


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Wait for something another thread does (not for time to pass)."""
    deadline = time.monotonic() + DEADLINE
    pause = threading.Event()
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        pause.wait(0.005)


class HeldStore:
    """The store, counting revision reads and recording each write of issued SVIDs; the
    write after ``hold_next()`` waits for ``release()``, then does what ``fault`` says."""

    def __init__(self, store: Datastore) -> None:
        self._store = store
        self.writes: list[tuple[list[IssuedSvid], list[AuditNote], int | None]] = []
        self.revision_reads = 0
        self.entered = threading.Event()
        self.while_held: Callable[[], None] = lambda: None
        self.fault: Callable[[list[IssuedSvid]], list[IssuedSvid]] = lambda svids: svids
        self._next: threading.Event | None = None
        self._held: threading.Event | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def current_revision(self) -> int:
        self.revision_reads += 1
        return self._store.current_revision()

    def hold_next(self) -> None:
        self._next = self._held = threading.Event()

    def release(self) -> None:
        assert self._held is not None
        self._held.set()

    def record_issued_svids(self, svids, *, audit=None, revision=None):
        notes = [audit] if isinstance(audit, AuditNote) else list(audit or ())
        self.writes.append((list(svids), notes, revision))
        hold, self._next = self._next, None
        if hold is not None:
            self.entered.set()
            assert hold.wait(DEADLINE), "the test never released the held write"
            self.while_held()
        self._store.record_issued_svids(self.fault(list(svids)), audit=audit, revision=revision)


class Signing(threading.Thread):
    """One request's sign_batch in a thread of its own, as the node API runs it."""

    def __init__(self, issuer: Issuer, agent: AttestedAgent, *entries: RegistrationEntry,
                 csrs: list[bytes] | None = None) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.issuer = issuer
        self.agent = agent
        self.requests = [
            (entry.id, csr) for entry, csr in zip(
                entries, csrs or [csr_for(e.spiffe_id)[0] for e in entries], strict=True)
        ]  # fmt: skip
        self.svids: list[IssuedX509] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.svids = self.issuer.sign_batch(self.agent, self.requests)
        except BaseException as error:  # the test reads it
            self.error = error


@pytest.fixture
def held(store: Datastore) -> HeldStore:
    return HeldStore(store)


@pytest.fixture
def grouping_issuer(held: HeldStore, authorities: Authorities, clock: ManualClock) -> Issuer:
    settings = IssuanceSettings(
        trust_domain=TRUST_DOMAIN,
        default_x509_svid_ttl=DEFAULT_X509_TTL,
        default_jwt_svid_ttl=DEFAULT_JWT_TTL,
    )
    return Issuer(settings, held, authorities, clock)  # type: ignore[arg-type]


def sign_together(issuer: Issuer, held: HeldStore, first: Signing, others: list[Signing],
                  *, queued: int | None = None) -> None:  # fmt: skip
    """Start ``first`` and hold its write; start the others, wait until ``queued`` of them
    (all, unless told) wait behind it; release; join every one."""
    held.hold_next()
    first.start()
    assert held.entered.wait(DEADLINE)
    for signing in others:
        signing.start()
    expected = len(others) if queued is None else queued
    wait_until(lambda: issuer.recording.waiting == expected, f"{expected} batches to queue")
    held.release()
    for signing in [first, *others]:
        signing.join(DEADLINE)
        assert not signing.is_alive()


def x509_events(store: Datastore) -> list[AuditEvent]:
    """The x509svid.issue events, oldest first."""
    return [e for e in reversed(store.list_audit()) if e.action == "x509svid.issue"]


def serials(svids: list[IssuedX509]) -> list[str]:
    return [format(svid.serial_number, "x") for svid in svids]


def test_batches_signed_during_a_write_share_the_next_transaction_and_audit_event(
    store, held, grouping_issuer, agent
):
    web, db, cache, api = (add_entry(store, f"spiffe://example.org/{name}", AGENT)
                           for name in ("web", "db", "cache", "api"))  # fmt: skip
    first = Signing(grouping_issuer, agent, web)
    others = [Signing(grouping_issuer, agent, entry) for entry in (db, cache, api)]

    sign_together(grouping_issuer, held, first, others)

    assert [s.error for s in [first, *others]] == [None] * 4
    assert [len(records) for records, _, _ in held.writes] == [1, 3]
    assert grouping_issuer.recording.groups == 2
    first_event, group_event = x509_events(store)
    assert first_event.details["svids"][0]["serial"] == serials(first.svids)[0]
    assert (group_event.actor, group_event.target) == (AGENT, AGENT)
    named = group_event.details["svids"]
    assert sorted(svid["serial"] for svid in named) == sorted(
        serial for signing in others for serial in serials(signing.svids))
    assert {svid["entry_id"] for svid in named} == {db.id, cache.id, api.id}
    assert set(named[0]) == {"serial", "spiffe_id", "entry_id", "authority_id", "expires_at"}
    assert store.count_issued_svids() == 4
    assert store.verify_audit() == AuditVerification(checked=len(store.list_audit()))


def test_the_revision_is_read_once_and_then_checked_in_each_group_s_transaction(
    store, held, grouping_issuer, agent
):
    web, db, api = (add_entry(store, f"spiffe://example.org/{name}", AGENT)
                    for name in ("web", "db", "api"))  # fmt: skip
    grouping_issuer.sign_batch(agent, [(web.id, csr_for(web.spiffe_id)[0])])
    assert held.revision_reads == 1
    first = Signing(grouping_issuer, agent, web)
    others = [Signing(grouping_issuer, agent, entry) for entry in (db, api)]

    sign_together(grouping_issuer, held, first, others)

    assert [s.error for s in [first, *others]] == [None] * 3
    assert held.revision_reads == 1  # no request read it again: each transaction checked it
    revision = store.current_revision()
    assert [condition for _, _, condition in held.writes] == [revision] * 3


def test_two_agents_in_one_group_get_an_event_each_in_one_transaction(
    store, held, grouping_issuer, agent, other_agent
):
    web = add_entry(store, "spiffe://example.org/web", AGENT)
    db = add_entry(store, "spiffe://example.org/db", AGENT)
    theirs = add_entry(store, "spiffe://example.org/theirs", OTHER_AGENT)
    first = Signing(grouping_issuer, agent, web)
    others = [Signing(grouping_issuer, agent, db), Signing(grouping_issuer, other_agent, theirs)]

    sign_together(grouping_issuer, held, first, others)

    assert [s.error for s in [first, *others]] == [None] * 3
    records, notes, _ = held.writes[1]
    assert len(records) == 2
    assert sorted(note.actor for note in notes) == sorted([AGENT, OTHER_AGENT])
    events = x509_events(store)[1:]
    by_actor = {event.actor: event for event in events}
    assert by_actor[AGENT].details["svids"][0]["entry_id"] == db.id
    assert by_actor[OTHER_AGENT].details["svids"][0]["entry_id"] == theirs.id
    assert by_actor[OTHER_AGENT].target == OTHER_AGENT
    assert [records_of_event["spiffe_id"] for records_of_event in
            by_actor[OTHER_AGENT].details["svids"]] == [theirs.spiffe_id]  # fmt: skip
    assert store.verify_audit().problem is None


def test_a_bad_csr_fails_its_own_request_and_not_the_others_of_its_group(
    store, held, grouping_issuer, agent
):
    web, db, api = (add_entry(store, f"spiffe://example.org/{name}", AGENT)
                    for name in ("web", "db", "api"))  # fmt: skip
    first = Signing(grouping_issuer, agent, web)
    bad = Signing(grouping_issuer, agent, db, csrs=[b"not a CSR"])
    good = Signing(grouping_issuer, agent, api)

    sign_together(grouping_issuer, held, first, [bad, good], queued=1)

    assert isinstance(bad.error, InvalidArgument)
    assert bad.error.message.startswith(f"CSR 0 (entry {db.id}): ")
    assert (first.error, good.error) == (None, None)
    assert store.count_issued_svids() == 2
    assert [e.details["svids"][0]["entry_id"] for e in x509_events(store)] == [web.id, api.id]


def test_a_group_write_that_fails_leaves_nothing_and_each_batch_is_written_alone(
    store, held, grouping_issuer, agent
):
    web, db, cache, api = (add_entry(store, f"spiffe://example.org/{name}", AGENT)
                           for name in ("web", "db", "cache", "api"))  # fmt: skip
    first = Signing(grouping_issuer, agent, web)
    others = [Signing(grouping_issuer, agent, entry) for entry in (db, cache, api)]

    def repeat_a_serial(svids: list[IssuedSvid]) -> list[IssuedSvid]:
        # cache's SVID gets the serial of web's: the database refuses the transaction.
        taken = held.writes[0][0][0].serial
        return [replace(s, serial=taken) if s.spiffe_id == cache.spiffe_id else s
                for s in svids]  # fmt: skip

    held.fault = repeat_a_serial
    sign_together(grouping_issuer, held, first, others)

    assert [len(records) for records, _, _ in held.writes] == [1, 3, 1, 1, 1]
    assert isinstance(others[1].error, AlreadyExists)
    assert [s.error for s in (first, others[0], others[2])] == [None] * 3
    assert sorted(spiffe_id for _, spiffe_id, _, _ in issued_rows(store_url(store))) == sorted(
        [web.spiffe_id, db.spiffe_id, api.spiffe_id])
    # web's group first; then db's and api's, each alone, in the order their threads
    # queued them (which the test does not fix).
    recorded = [e.details["svids"][0]["entry_id"] for e in x509_events(store)]
    assert recorded[0] == web.id
    assert sorted(recorded[1:]) == sorted(s.requests[0][0] for s in (others[0], others[2]))
    assert store.verify_audit().problem is None


def test_a_write_the_datastore_cannot_make_fails_every_request_of_the_group(
    store, held, grouping_issuer, agent
):
    web, db, api = (add_entry(store, f"spiffe://example.org/{name}", AGENT)
                    for name in ("web", "db", "api"))  # fmt: skip
    first = Signing(grouping_issuer, agent, web)
    others = [Signing(grouping_issuer, agent, entry) for entry in (db, api)]

    def unavailable(svids: list[IssuedSvid]) -> list[IssuedSvid]:
        if len(held.writes) > 1:
            raise Unavailable("the datastore is unavailable: connection refused")
        return svids

    held.fault = unavailable
    sign_together(grouping_issuer, held, first, others)

    assert first.error is None
    assert [str(s.error) for s in others] == [
        "the datastore is unavailable: connection refused"] * 2
    assert len(held.writes) == 2  # not retried one by one: the store is down for all
    assert store.count_issued_svids() == 1
    assert len(x509_events(store)) == 1
    assert store.verify_audit().problem is None


def test_an_entry_that_changes_while_its_batch_waits_is_checked_again_before_recording(
    store, held, grouping_issuer, agent, clock
):
    web, db, cache, api = (add_entry(store, f"spiffe://example.org/{name}", AGENT)
                           for name in ("web", "db", "cache", "api"))  # fmt: skip
    first = Signing(grouping_issuer, agent, web)
    deleted = Signing(grouping_issuer, agent, db)
    changed = Signing(grouping_issuer, agent, cache)
    unchanged = Signing(grouping_issuer, agent, api)

    def change_the_entries() -> None:  # after the three have signed, before anything is written
        store.delete_entry(db.id)
        store.update_entry(cache.id, replace(as_new_entry(cache), x509_svid_ttl=120))

    held.while_held = change_the_entries
    sign_together(grouping_issuer, held, first, [deleted, changed, unchanged])

    assert isinstance(deleted.error, PermissionDenied)
    assert deleted.error.message == f"entry {db.id} is not authorized for agent {AGENT}"
    assert (first.error, changed.error, unchanged.error) == (None, None, None)
    # signed again, at the entry's new TTL, once the group saw the revision had moved
    assert changed.svids[0].expires_at == clock.now() + timedelta(seconds=120)
    assert unchanged.svids[0].expires_at == clock.now() + DEFAULT_X509_TTL
    recorded = {spiffe_id for _, spiffe_id, _, _ in issued_rows(store_url(store))}
    assert recorded == {web.spiffe_id, cache.spiffe_id, api.spiffe_id}
    named = [svid["serial"] for e in x509_events(store) for svid in e.details["svids"]]
    assert sorted(named) == sorted(
        serials(first.svids) + serials(changed.svids) + serials(unchanged.svids))
    assert store.verify_audit().problem is None


def store_url(store: Datastore) -> str:
    return str(store._engines.engine.url)  # type: ignore[attr-defined]


# -- small batches signed on the event loop ---------------------------------------------


def sign_async(issuer: Issuer, agent: AttestedAgent, *entries: RegistrationEntry
               ) -> list[IssuedX509] | None:  # fmt: skip
    requests = [(entry.id, csr_for(entry.spiffe_id)[0]) for entry in entries]
    return asyncio.run(issuer.sign_batch_async(agent, requests))


def test_a_batch_is_not_signed_on_the_loop_until_the_revision_is_known(
    store, held, grouping_issuer, agent
):
    web = add_entry(store, "spiffe://example.org/web", AGENT)

    assert sign_async(grouping_issuer, agent, web) is None

    assert (held.revision_reads, held.writes, store.count_issued_svids()) == (0, [], 0)


def test_a_batch_is_signed_on_the_loop_from_memory_and_recorded_before_it_returns(
    store, held, grouping_issuer, agent
):
    web, db = (add_entry(store, f"spiffe://example.org/{name}", AGENT) for name in ("web", "db"))
    grouping_issuer.sign_batch(agent, [(web.id, csr_for(web.spiffe_id)[0])])

    [issued] = sign_async(grouping_issuer, agent, db) or []

    assert issued.entry_id == db.id
    assert held.revision_reads == 1  # the first batch's; none since
    assert held.writes[-1][2] == store.current_revision()  # the write checked it
    [event, _] = x509_events(store)[::-1]
    assert event.details["svids"][0]["serial"] == format(issued.serial_number, "x")
    assert store.count_issued_svids() == 2
    assert store.verify_audit().problem is None


def test_batches_signed_on_the_loop_in_one_turn_share_a_transaction_and_an_event(
    store, held, grouping_issuer, agent
):
    entries = [add_entry(store, f"spiffe://example.org/w{n}", AGENT) for n in range(4)]
    grouping_issuer.sign_batch(agent, [(entries[0].id, csr_for(entries[0].spiffe_id)[0])])

    async def together() -> list[list[IssuedX509] | None]:
        return await asyncio.gather(*(
            grouping_issuer.sign_batch_async(agent, [(e.id, csr_for(e.spiffe_id)[0])])
            for e in entries[1:]))  # fmt: skip

    answers = asyncio.run(together())

    assert [len(answer or []) for answer in answers] == [1, 1, 1]
    assert [len(records) for records, _, _ in held.writes] == [1, 3]
    group_event = x509_events(store)[-1]
    assert sorted(svid["entry_id"] for svid in group_event.details["svids"]) == sorted(
        e.id for e in entries[1:])
    assert store.verify_audit().problem is None


def test_an_entry_memory_does_not_know_sends_the_batch_to_a_worker_thread(
    store, held, grouping_issuer, agent
):
    web = add_entry(store, "spiffe://example.org/web", AGENT)
    grouping_issuer.sign_batch(agent, [(web.id, csr_for(web.spiffe_id)[0])])
    new = add_entry(store, "spiffe://example.org/new", AGENT)  # after the revision it knows
    unknown = replace(new, id="no-such-entry")

    assert sign_async(grouping_issuer, agent, new) is None
    assert sign_async(grouping_issuer, agent, unknown) is None
    assert len(held.writes) == 1
    [issued] = grouping_issuer.sign_batch(agent, [(new.id, csr_for(new.spiffe_id)[0])])
    assert issued.entry_id == new.id


def test_a_bad_csr_is_refused_on_the_loop_with_nothing_recorded(
    store, held, grouping_issuer, agent
):
    web = add_entry(store, "spiffe://example.org/web", AGENT)
    grouping_issuer.sign_batch(agent, [(web.id, csr_for(web.spiffe_id)[0])])

    with pytest.raises(InvalidArgument, match=rf"^CSR 0 \(entry {web.id}\): "):
        asyncio.run(grouping_issuer.sign_batch_async(agent, [(web.id, b"not a CSR")]))
    assert len(held.writes) == 1


def test_an_entry_deleted_before_its_loop_batch_is_written_is_not_recorded(
    store, held, grouping_issuer, agent
):
    web = add_entry(store, "spiffe://example.org/web", AGENT)
    db = add_entry(store, "spiffe://example.org/db", AGENT)
    grouping_issuer.sign_batch(agent, [(web.id, csr_for(web.spiffe_id)[0])])
    held.hold_next()
    held.release()  # nothing waits: the test only needs the change before the write
    held.while_held = lambda: store.delete_entry(db.id)

    assert sign_async(grouping_issuer, agent, db) is None  # signed, refused, not recorded

    assert store.count_issued_svids() == 1
    with pytest.raises(PermissionDenied):
        grouping_issuer.sign_batch(agent, [(db.id, csr_for(db.spiffe_id)[0])])
    assert store.count_issued_svids() == 1
    assert store.verify_audit().problem is None
