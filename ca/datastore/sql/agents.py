"""Attested agents and their aliases."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session

from attestor.selector import Selector
from ca.datastore.records import AttestedAgent, AuditNote
from ca.datastore.schema import ENTRY_REVISION, AgentAliasRow, AgentRow, AgentSelectorRow
from ca.datastore.sql.audit import _append_audit, _audit_details
from ca.datastore.sql.base import (
    SqlBase,
    _bump,
    _insert_on_conflict,
    _normalise,
    _stored_time,
    _table,
)
from ca.datastore.sql.join_tokens import _redeem_join_token
from sdk.errors import NotFound


class AgentsMixin(SqlBase):
    """:class:`~ca.datastore.interface.AgentStore` on SQL."""

    def register_agent(
        self,
        spiffe_id: str,
        *,
        attestation_type: str,
        serial: str,
        expires_at: datetime,
        selectors: Sequence[Selector] = (),
        aliases: Sequence[str] = (),
        join_token: str | None = None,
        audit: AuditNote | None = None,
    ) -> AttestedAgent:
        """Record an agent that attested, in one transaction: redeem its ``join_token``
        (NotFound if another attestation used it meanwhile, FailedPrecondition if it
        expired), then the agent (new, or refreshed when it attests again: its ``banned``
        flag, aliases and ``created_at`` stay), its ``aliases`` and the ``audit`` event.
        A refusal leaves the token, the agent and the log as they were."""
        now = self._clock.now()
        values: dict[str, Any] = {
            "spiffe_id": spiffe_id,
            "attestation_type": attestation_type,
            "serial": serial,
            "previous_serial": "",
            "expires_at": expires_at,
            "banned": False,
            "created_at": now,
            "updated_at": now,
        }
        recorded = _audit_details(audit.details) if audit is not None else {}
        with self._changing_agent(spiffe_id) as session:
            if join_token is not None:
                _redeem_join_token(session, join_token, now)
            self._upsert_agent_rows(session, values, selectors)
            added = False
            for alias in dict.fromkeys(aliases):
                statement = _insert_on_conflict(
                    self.dialect,
                    AgentAliasRow,
                    {"agent_id": spiffe_id, "alias_id": alias},
                    keys=("agent_id", "alias_id"),
                )
                # RETURNING names the row only when it was inserted.
                inserted = session.execute(statement.returning(AgentAliasRow.alias_id)).first()
                added = added or inserted is not None
            if added:
                _bump(session, ENTRY_REVISION)
            if audit is not None:
                _append_audit(session, now, audit.actor, audit.action, audit.target, recorded)
            agent = _agent_record(_agent_row(session, spiffe_id))
        return agent

    def _upsert_agent_rows(
        self, session: Session, values: dict[str, Any], selectors: Sequence[Selector]
    ) -> None:
        spiffe_id = values["spiffe_id"]
        # Attesting again invalidates every SVID the agent held before.
        refreshed = ("attestation_type", "serial", "previous_serial", "expires_at", "updated_at")
        session.connection().execute(
            _insert_on_conflict(
                self.dialect,
                AgentRow,
                values,
                keys=("spiffe_id",),
                changes={name: values[name] for name in refreshed},
            )
        )
        session.execute(delete(AgentSelectorRow).where(AgentSelectorRow.agent_id == spiffe_id))
        rows = [
            {"agent_id": spiffe_id, "type": s.type, "value": s.value}
            for s in _normalise(selectors)
        ]
        if rows:
            session.execute(insert(AgentSelectorRow), rows)

    def get_agent(self, spiffe_id: str) -> AttestedAgent:
        with self._reading() as session:
            return _agent_record(_agent_row(session, spiffe_id))

    def list_agents(self) -> list[AttestedAgent]:
        with self._reading() as session:
            rows = session.scalars(select(AgentRow).order_by(AgentRow.spiffe_id))
            return [_agent_record(row) for row in rows]

    def count_agents(self) -> int:
        with self._reading() as session:
            return session.scalar(select(func.count()).select_from(AgentRow)) or 0

    def update_agent_serial(
        self, spiffe_id: str, serial: str, expires_at: datetime
    ) -> AttestedAgent:
        """Record the serial and expiry of the agent's renewed SVID; the serial it
        replaces stays acceptable until :meth:`confirm_agent_serial`."""
        with self._changing_agent(spiffe_id) as session:
            row = _agent_row(session, spiffe_id)
            row.previous_serial = row.serial
            row.serial = serial
            row.expires_at = expires_at
            row.updated_at = self._clock.now()
            session.flush()
            agent = _agent_record(row)
        return agent

    def confirm_agent_serial(self, spiffe_id: str) -> None:
        """The agent used its renewed SVID: the one before it is no longer accepted."""
        with self._changing_agent(spiffe_id) as session:
            row = _agent_row(session, spiffe_id)
            row.previous_serial = ""

    def set_agent_banned(self, spiffe_id: str, banned: bool) -> AttestedAgent:
        with self._changing_agent(spiffe_id) as session:
            row = _agent_row(session, spiffe_id)
            row.banned = banned
            row.updated_at = self._clock.now()
            session.flush()
            agent = _agent_record(row)
        return agent

    def delete_agent(self, spiffe_id: str) -> None:
        """Evict the agent (it must attest again); its selectors and aliases go
        too, and losing aliases bumps the entry revision."""
        with self._changing_agent(spiffe_id) as session:
            connection = session.connection()
            aliases = connection.execute(
                delete(_table(AgentAliasRow)).where(AgentAliasRow.agent_id == spiffe_id)
            )
            removed = connection.execute(
                delete(_table(AgentRow)).where(AgentRow.spiffe_id == spiffe_id)
            )
            if removed.rowcount == 0:
                raise _agent_not_found(spiffe_id)
            if aliases.rowcount:
                _bump(session, ENTRY_REVISION)

    def add_agent_alias(self, agent_id: str, alias_id: str) -> None:
        """Let the agent also answer for ``alias_id`` (entries parented to the
        alias go to the agent). Idempotent; a new alias bumps the entry revision."""
        conflict = f"agent {agent_id} was evicted while its alias was added; let it attest again"
        with self._writing(conflict=conflict) as session:
            agent = select(AgentRow.spiffe_id).where(AgentRow.spiffe_id == agent_id)
            if session.scalar(agent) is None:
                raise _agent_not_found(agent_id)
            statement = _insert_on_conflict(
                self.dialect,
                AgentAliasRow,
                {"agent_id": agent_id, "alias_id": alias_id},
                keys=("agent_id", "alias_id"),
            )
            # RETURNING names the row only when it was inserted (rowcount of an
            # INSERT is not reported by every driver).
            added = session.execute(statement.returning(AgentAliasRow.alias_id)).first()
            if added is not None:
                _bump(session, ENTRY_REVISION)

    def agent_aliases(self, agent_id: str) -> set[str]:
        """The aliases of the agent (empty for an unknown agent)."""
        query = select(AgentAliasRow.alias_id).where(AgentAliasRow.agent_id == agent_id)
        with self._reading() as session:
            return set(session.scalars(query))


def _agent_row(session: Session, spiffe_id: str) -> AgentRow:
    row = session.get(AgentRow, spiffe_id, populate_existing=True)
    if row is None:
        raise _agent_not_found(spiffe_id)
    return row


def _agent_not_found(spiffe_id: str) -> NotFound:
    return NotFound(f"agent {spiffe_id} not found; list agents to see the attested ones")


def _agent_record(row: AgentRow) -> AttestedAgent:
    return AttestedAgent(
        spiffe_id=row.spiffe_id,
        attestation_type=row.attestation_type,
        serial=row.serial,
        previous_serial=row.previous_serial,
        expires_at=_stored_time(row.expires_at),
        selectors=tuple(sorted(Selector(s.type, s.value) for s in row.selectors)),
        banned=row.banned,
        created_at=_stored_time(row.created_at),
        updated_at=_stored_time(row.updated_at),
    )
