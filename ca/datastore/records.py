"""The values the datastore takes and returns: frozen dataclasses, never ORM objects.

A record read from the store can be kept, shared between threads and compared
freely; changing a record means asking the store for a new one::

    entry = store.create_entry(NewEntry(spiffe_id=..., parent_id=..., selectors=(sel,)))
    entry = store.update_entry(entry.id, replace(as_new_entry(entry), hint="web"))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from attestor.selector import Selector
from mesh import Change
from mesh.catalog import Health, Instance
from sdk.address import HostPort

X509 = "x509"
JWT = "jwt"
AUTHORITY_KINDS = (X509, JWT)

PREPARED = "prepared"
ACTIVE = "active"
OLD = "old"
AUTHORITY_STATUSES = (PREPARED, ACTIVE, OLD)

SELECTOR_MATCHES = ("exact", "subset", "superset", "any")


@dataclass(frozen=True)
class NewEntry:
    """A registration entry as a caller describes it (create or full replacement)."""

    spiffe_id: str
    parent_id: str
    selectors: tuple[Selector, ...] = ()
    x509_svid_ttl: int = 0
    jwt_svid_ttl: int = 0
    dns_names: tuple[str, ...] = ()
    federates_with: tuple[str, ...] = ()
    admin: bool = False
    downstream: bool = False
    node: bool = False
    hint: str = ""
    expires_at: int | None = None


@dataclass(frozen=True)
class RegistrationEntry:
    """A stored registration entry; ``deleted`` ones (tombstones) only come from
    :meth:`Datastore.entries_changed_since`."""

    id: str
    spiffe_id: str
    parent_id: str
    selectors: tuple[Selector, ...]
    x509_svid_ttl: int
    jwt_svid_ttl: int
    dns_names: tuple[str, ...]
    federates_with: tuple[str, ...]
    admin: bool
    downstream: bool
    node: bool
    hint: str
    expires_at: int | None
    revision: int
    created_at: datetime
    deleted: bool = False


def as_new_entry(entry: RegistrationEntry) -> NewEntry:
    """The caller-owned fields of ``entry``, e.g. to change one and update it."""
    return NewEntry(
        spiffe_id=entry.spiffe_id,
        parent_id=entry.parent_id,
        selectors=entry.selectors,
        x509_svid_ttl=entry.x509_svid_ttl,
        jwt_svid_ttl=entry.jwt_svid_ttl,
        dns_names=entry.dns_names,
        federates_with=entry.federates_with,
        admin=entry.admin,
        downstream=entry.downstream,
        node=entry.node,
        hint=entry.hint,
        expires_at=entry.expires_at,
    )


@dataclass(frozen=True)
class AttestedAgent:
    spiffe_id: str
    attestation_type: str
    serial: str
    expires_at: datetime
    selectors: tuple[Selector, ...]
    banned: bool
    created_at: datetime
    updated_at: datetime
    previous_serial: str = ""
    """The serial before the last renewal, until the renewed SVID is first used."""


@dataclass(frozen=True)
class JoinToken:
    token: str
    alias_id: str | None
    expires_at: datetime


@dataclass(frozen=True)
class Authority:
    """One CA key slot in the CA journal."""

    authority_id: str
    kind: str
    server_id: str
    status: str
    tainted: bool
    revoked: bool
    key_id: str
    key_type: str
    not_before: datetime
    not_after: datetime
    certificate: bytes | None
    chain: bytes
    upstream_roots: bytes
    public_key: bytes
    created_at: datetime


@dataclass(frozen=True)
class FederatedBundle:
    trust_domain: str
    bundle: bytes
    updated_at: datetime


HTTPS_WEB = "https_web"
HTTPS_SPIFFE = "https_spiffe"
BUNDLE_ENDPOINT_PROFILES = (HTTPS_WEB, HTTPS_SPIFFE)


@dataclass(frozen=True)
class NewFederationRelationship:
    """A federation relationship as a caller describes it (create or full replacement).

    ``endpoint_spiffe_id`` is the ID the bundle endpoint's certificate must carry
    with profile ``https_spiffe``; None with ``https_web``.
    """

    trust_domain: str
    bundle_endpoint_url: str
    profile: str
    endpoint_spiffe_id: str | None = None


@dataclass(frozen=True)
class FederationRelationship:
    """A stored federation relationship. ``last_refresh_at`` is when the last fetch
    of the bundle endpoint ended; ``last_error`` says why it failed (None: it worked)."""

    trust_domain: str
    bundle_endpoint_url: str
    profile: str
    endpoint_spiffe_id: str | None
    created_at: datetime
    updated_at: datetime
    last_refresh_at: datetime | None = None
    last_error: str | None = None


@dataclass(frozen=True)
class IssuedSvid:
    serial: str
    spiffe_id: str
    kind: str
    agent_id: str | None
    authority_id: str
    expires_at: datetime


@dataclass(frozen=True)
class SharedRoot:
    """A root CA every server of the trust domain signs its authorities under."""

    generation: int
    certificate: bytes  # DER
    encrypted_key: bytes  # PEM, PKCS#8 encrypted under the servers' shared KEK
    not_before: datetime
    not_after: datetime
    created_at: datetime


@dataclass(frozen=True)
class ServerLease:
    """A running server's hold on its server ID (see :mod:`ca.serverlease`)."""

    server_id: str
    nonce: str  # made by each process as it starts
    hostname: str
    pid: int
    pid_namespace: str  # where ``pid`` names a process: boot id and pid namespace
    started_at: datetime
    renewed_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class MeshResource:
    """One stored resource of the mesh configuration, as applied; ``deleted`` ones
    (tombstones) only come from :meth:`Datastore.mesh_changed_since`."""

    kind: str
    name: str
    document: dict[str, Any]
    """The resource in the Istio shape it was applied in (``apiVersion``, ``kind``,
    ``metadata``, ``spec``)."""
    revision: int
    """The mesh revision of the apply (or delete) that last changed it."""
    created_at: datetime
    updated_at: datetime
    deleted: bool = False


@dataclass(frozen=True)
class MeshApplyResult:
    """What :meth:`Datastore.apply_mesh` did: each resource of the input, in its order,
    ``created``, ``configured`` or ``unchanged``; and the mesh revision the stored
    configuration is at afterwards (unchanged by a dry run or an apply that changed
    nothing)."""

    revision: int
    changes: tuple[Change, ...]
    dry_run: bool = False

    @property
    def changed(self) -> tuple[Change, ...]:
        """The changes that are not ``unchanged``."""
        return tuple(change for change in self.changes if change.action != "unchanged")


@dataclass(frozen=True)
class InstanceKey:
    """What names an instance: the agent that registered it, its Service, its address."""

    node: str
    service: str
    address: str  # HOST:PORT

    @classmethod
    def of(cls, instance: Instance) -> InstanceKey:
        return cls(instance.node, instance.service, str(instance.address))


@dataclass(frozen=True)
class ReportedInstance:
    """One instance as its agent reports it (the node is the reporting agent)."""

    service: str
    address: HostPort
    spiffe_id: str
    labels: Mapping[str, str]
    health: Health
    detail: str | None = None
    """Why it is unhealthy (its check's last failure); None when it is not."""


@dataclass(frozen=True)
class MeshChanges:
    """The answer of :meth:`Datastore.mesh_changed_since`."""

    revision: int
    """The mesh revision the configuration is at."""
    resources: tuple[MeshResource, ...]
    """Changed resources and tombstones, in revision order (every live resource when
    ``full``)."""
    full: bool = False
    """The caller must replace its whole configuration with ``resources``, and its
    catalog with ``instances``."""
    instances: tuple[Instance, ...] = ()
    """Instances registered or changed (every live one when ``full``)."""
    removed_instances: tuple[InstanceKey, ...] = ()
    """Instances gone (deregistered, refused, or their agent's lease ran out)."""


@dataclass(frozen=True)
class AuditNote:
    """An audit event to write in the same transaction as the change it records."""

    actor: str
    action: str
    target: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditEvent:
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    details: dict[str, Any] = field(default_factory=dict)
    hash: str = ""


@dataclass(frozen=True)
class AuditVerification:
    """The outcome of checking the audit log's hash chain."""

    checked: int
    problem: str | None = None
    event_id: int | None = None  # the event the problem names

    @property
    def intact(self) -> bool:
        return self.problem is None
