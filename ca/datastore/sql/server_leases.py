"""Server leases: one running process per server ID."""

from __future__ import annotations

from dataclasses import fields as dataclass_fields
from datetime import timedelta

from sqlalchemy import delete

from ca.datastore.records import ServerLease
from ca.datastore.schema import ServerLeaseRow
from ca.datastore.sql.base import SqlBase
from sdk.errors import FailedPrecondition


class ServerLeasesMixin(SqlBase):
    """:class:`~ca.datastore.interface.ServerLeaseStore` on SQL."""

    def claim_server_lease(
        self,
        server_id: str,
        nonce: str,
        *,
        ttl: timedelta,
        hostname: str,
        pid: int,
        pid_namespace: str,
        replacing: str | None = None,
    ) -> ServerLease:
        """Take the lease on ``server_id`` for the process ``nonce`` unless another
        process holds it and it has not expired (or it is the lease ``replacing``, whose
        holder is known to be gone). Returns the lease as it now stands: ours, or the
        other process's, unchanged."""
        now = self._clock.now()
        conflict = f"another server took the lease on server ID {server_id} at the same time"
        with self._writing(conflict=conflict) as session:
            row = session.get(ServerLeaseRow, server_id, with_for_update=True)
            if (row is not None and row.nonce not in (nonce, replacing)
                    and row.expires_at > now):
                return _server_lease_record(row)
            if row is None:
                row = ServerLeaseRow(server_id=server_id)
                session.add(row)
            row.nonce, row.hostname, row.pid = nonce, hostname, pid
            row.pid_namespace = pid_namespace
            row.started_at = row.renewed_at = now
            row.expires_at = now + ttl
            session.flush()
            return _server_lease_record(row)

    def renew_server_lease(self, server_id: str, nonce: str, *, ttl: timedelta) -> ServerLease:
        """Extend the lease ``nonce`` holds on ``server_id``. Returns the lease as it now
        stands: another process's, unchanged, when it has taken the ID over."""
        now = self._clock.now()
        with self._writing() as session:
            row = session.get(ServerLeaseRow, server_id, with_for_update=True)
            if row is None:
                raise FailedPrecondition(
                    f"the lease on server ID {server_id} is gone from the datastore"
                )
            if row.nonce == nonce:
                row.renewed_at = now
                row.expires_at = now + ttl
                session.flush()
            return _server_lease_record(row)

    def release_server_lease(self, server_id: str, nonce: str) -> None:
        """Give up the lease ``nonce`` holds on ``server_id`` (a clean stop), so the
        server may start again at once; a lease held by another process stays."""
        with self._writing() as session:
            session.execute(
                delete(ServerLeaseRow).where(
                    ServerLeaseRow.server_id == server_id, ServerLeaseRow.nonce == nonce
                )
            )


_SERVER_LEASE_FIELDS = tuple(f.name for f in dataclass_fields(ServerLease))


def _server_lease_record(row: ServerLeaseRow) -> ServerLease:
    return ServerLease(**{f: getattr(row, f) for f in _SERVER_LEASE_FIELDS})
