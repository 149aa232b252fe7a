"""The server's datastore (SQLite embedded, PostgreSQL for several servers).

    from ca.datastore import Datastore, NewEntry

    store = Datastore.open("sqlite:////var/lib/tessera/datastore.sqlite3")
    entry = store.create_entry(NewEntry(spiffe_id, parent_id, selectors=(selector,)))

Modules: ``interface`` (the Protocols, one per kind of record, and the
``Datastore`` Protocol combining them: what code taking a store is typed
against), ``sql`` (``SqlDatastore``, the implementation, one module per kind of
record), ``store`` (``Datastore``, the name ``SqlDatastore`` is opened by),
``records`` (the frozen values it takes and returns), ``schema`` (tables),
``migrate`` (Alembic, run on open), ``engine`` (URLs and connection settings),
``translate`` (SQLAlchemy errors into Tessera's, at one boundary).
"""

from ca.datastore.engine import default_datastore_url
from ca.datastore.records import (
    AttestedAgent,
    AuditEvent,
    AuditNote,
    AuditVerification,
    Authority,
    FederatedBundle,
    FederationRelationship,
    IssuedSvid,
    JoinToken,
    MeshApplyResult,
    MeshChanges,
    MeshResource,
    NewEntry,
    NewFederationRelationship,
    RegistrationEntry,
    SharedRoot,
    as_new_entry,
)
from ca.datastore.store import Datastore

__all__ = [
    "AttestedAgent",
    "AuditEvent",
    "AuditNote",
    "AuditVerification",
    "Authority",
    "Datastore",
    "FederatedBundle",
    "FederationRelationship",
    "IssuedSvid",
    "JoinToken",
    "MeshApplyResult",
    "MeshChanges",
    "MeshResource",
    "NewEntry",
    "NewFederationRelationship",
    "RegistrationEntry",
    "SharedRoot",
    "as_new_entry",
    "default_datastore_url",
]
