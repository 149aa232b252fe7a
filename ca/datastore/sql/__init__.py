"""The datastore on SQLAlchemy: SQLite (embedded) or PostgreSQL (several servers
on one database), behaving the same.

    store = open_datastore("sqlite:////var/lib/tessera/datastore.sqlite3")

One mixin per kind of record (``entries``, ``agents``, ``join_tokens``,
``authorities``, ``shared_roots``, ``server_leases``, ``federation``,
``issued_svids``, ``mesh``, ``mesh_catalog``, ``audit``, ``counters``) over
:class:`~ca.datastore.sql.base.SqlBase`,
which holds the engines and the one session boundary where SQLAlchemy errors
become Tessera's. Opening migrates the schema (:mod:`ca.datastore.migrate`).
"""

from __future__ import annotations

from ca.datastore.interface import Datastore
from ca.datastore.sql.agents import AgentsMixin
from ca.datastore.sql.audit import AuditMixin
from ca.datastore.sql.authorities import AuthoritiesMixin
from ca.datastore.sql.base import SqlBase
from ca.datastore.sql.counters import CountersMixin
from ca.datastore.sql.entries import EntriesMixin
from ca.datastore.sql.federation import FederatedBundlesMixin, FederationRelationshipsMixin
from ca.datastore.sql.issued_svids import IssuedSvidsMixin
from ca.datastore.sql.join_tokens import JoinTokensMixin
from ca.datastore.sql.mesh import MeshMixin
from ca.datastore.sql.mesh_catalog import MeshCatalogMixin
from ca.datastore.sql.server_leases import ServerLeasesMixin
from ca.datastore.sql.shared_roots import SharedRootsMixin
from sdk.clock import SYSTEM_CLOCK, Clock

__all__ = ["SqlDatastore", "open_datastore"]


class SqlDatastore(
    CountersMixin,
    EntriesMixin,
    AgentsMixin,
    JoinTokensMixin,
    AuthoritiesMixin,
    SharedRootsMixin,
    ServerLeasesMixin,
    FederatedBundlesMixin,
    FederationRelationshipsMixin,
    IssuedSvidsMixin,
    MeshMixin,
    MeshCatalogMixin,
    AuditMixin,
    SqlBase,
):
    """The server's persistent state in a SQL database. Create with :meth:`open`."""


def open_datastore(url: str, *, clock: Clock = SYSTEM_CLOCK) -> Datastore:
    """Connect, create or migrate the schema, and return the store (see
    :meth:`SqlBase.open <ca.datastore.sql.base.SqlBase.open>` for the errors)."""
    return SqlDatastore.open(url, clock=clock)


# mypy checks here that the SQL store has every method of the Protocol, as typed there.
_conforms: type[Datastore] = SqlDatastore
