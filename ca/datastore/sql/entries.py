"""Registration entries and their tombstones."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Collection, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, func, insert, not_, or_, select, update
from sqlalchemy.orm import Session, aliased

from attestor.selector import Selector
from ca.datastore.records import SELECTOR_MATCHES, NewEntry, RegistrationEntry
from ca.datastore.schema import (
    ENTRY_REVISION,
    TOMBSTONE_HORIZON,
    CounterRow,
    EntryRow,
    EntrySelectorRow,
)
from ca.datastore.sql.audit import _append_audit
from ca.datastore.sql.base import (
    SqlBase,
    _bump,
    _check_choice,
    _counter,
    _normalise,
    _stored_time,
    _table,
)
from sdk.errors import AlreadyExists, InvalidArgument, NotFound

# Parent IDs per query in entries_by_parent; keeps far below every driver's
# limit on bound parameters.
_IN_CHUNK = 500


class EntriesMixin(SqlBase):
    """:class:`~ca.datastore.interface.EntryStore` on SQL."""

    def create_entry(self, entry: NewEntry, *, audited_by: str | None = None) -> RegistrationEntry:
        """Store a new entry; AlreadyExists if a live entry has the same SPIFFE ID,
        parent ID and selector set. With ``audited_by``, the ``entry.create`` audit
        event (by that actor) is written in the same transaction."""
        selectors = _normalise(entry.selectors)
        key = _live_key(entry.spiffe_id, entry.parent_id, selectors)
        entry_id = str(uuid.uuid4())
        now = self._clock.now()
        with self._writing(conflict=_entry_conflict(entry)) as session:
            revision = _bump(session, ENTRY_REVISION)
            _refuse_duplicate_entry(session, entry, key, entry_id)
            session.execute(
                insert(EntryRow).values(
                    id=entry_id,
                    live_key=key,
                    revision=revision,
                    created_at=now,
                    deleted=False,
                    **_entry_columns(entry),
                )
            )
            _insert_entry_selectors(session, entry_id, selectors)
            if audited_by is not None:
                _audit_entry(session, audited_by, "entry.create", entry_id, entry.spiffe_id, now)
        return _entry_record_from(entry_id, entry, selectors, revision, now)

    def get_entry(self, entry_id: str) -> RegistrationEntry:
        with self._reading() as session:
            row = session.scalar(select(EntryRow).where(_live_entry(entry_id)))
            if row is None:
                raise _entry_not_found(entry_id)
            return _entry_record(row)

    def update_entry(
        self, entry_id: str, entry: NewEntry, *, audited_by: str | None = None
    ) -> RegistrationEntry:
        """Replace every caller-owned field of the entry; the entry gets a new revision.
        ``audited_by`` as for :meth:`create_entry` (event ``entry.update``)."""
        selectors = _normalise(entry.selectors)
        key = _live_key(entry.spiffe_id, entry.parent_id, selectors)
        with self._writing(conflict=_entry_conflict(entry)) as session:
            revision = _bump(session, ENTRY_REVISION)
            created_at = session.scalar(select(EntryRow.created_at).where(_live_entry(entry_id)))
            if created_at is None:
                raise _entry_not_found(entry_id)
            _refuse_duplicate_entry(session, entry, key, entry_id)
            session.execute(
                update(EntryRow)
                .where(EntryRow.id == entry_id)
                .values(live_key=key, revision=revision, **_entry_columns(entry))
                .execution_options(synchronize_session=False)
            )
            session.execute(delete(EntrySelectorRow).where(EntrySelectorRow.entry_id == entry_id))
            _insert_entry_selectors(session, entry_id, selectors)
            if audited_by is not None:
                _audit_entry(
                    session, audited_by, "entry.update", entry_id, entry.spiffe_id,
                    self._clock.now(),
                )
        return _entry_record_from(entry_id, entry, selectors, revision, created_at)

    def delete_entry(self, entry_id: str, *, audited_by: str | None = None) -> RegistrationEntry:
        """Delete the entry, leaving a tombstone (``deleted=True``, a new revision)
        for incremental sync; returns the tombstone. ``audited_by`` as for
        :meth:`create_entry` (event ``entry.delete``)."""
        with self._writing() as session:
            revision = _bump(session, ENTRY_REVISION)
            row = session.scalar(select(EntryRow).where(_live_entry(entry_id)))
            if row is None:
                raise _entry_not_found(entry_id)
            record = _entry_record(row)
            session.execute(
                update(EntryRow)
                .where(EntryRow.id == entry_id)
                .values(deleted=True, live_key=None, revision=revision)
                .execution_options(synchronize_session=False)
            )
            if audited_by is not None:
                _audit_entry(
                    session, audited_by, "entry.delete", entry_id, record.spiffe_id,
                    self._clock.now(),
                )
        return replace(record, deleted=True, revision=revision)

    def list_entries(
        self,
        *,
        spiffe_id: str | None = None,
        parent_id: str | None = None,
        selectors: Sequence[Selector] | None = None,
        selector_match: str = "superset",
        limit: int | None = None,
        offset: int = 0,
    ) -> list[RegistrationEntry]:
        """Live entries matching every filter given, oldest first.

        ``selector_match`` says how an entry's selectors relate to ``selectors``:
        ``exact`` (the same set), ``subset`` (all of the entry's are among them:
        the entries a workload with these selectors gets), ``superset`` (the
        entry has all of them, maybe more) or ``any`` (at least one in common).
        """
        query = select(EntryRow).where(EntryRow.deleted.is_(False))
        if spiffe_id is not None:
            query = query.where(EntryRow.spiffe_id == spiffe_id)
        if parent_id is not None:
            query = query.where(EntryRow.parent_id == parent_id)
        if selectors is not None:
            query = query.where(_selector_filter(selectors, selector_match))
        if (limit is not None and limit < 0) or offset < 0:
            raise InvalidArgument("limit and offset must not be negative")
        query = query.order_by(EntryRow.created_at, EntryRow.id).offset(offset).limit(limit)
        with self._reading() as session:
            return [_entry_record(row) for row in session.scalars(query)]

    def search_entries(
        self,
        *,
        text: str | None = None,
        parent_id: str | None = None,
        selectors: Sequence[Selector] | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[list[RegistrationEntry], int]:
        """A page of live entries whose SPIFFE ID contains ``text`` (or whose ID is
        ``text``), of ``parent_id``, having every one of ``selectors``; by SPIFFE ID then
        ID. Also how many match in all (the console's entry search)."""
        if limit < 0 or offset < 0:
            raise InvalidArgument("limit and offset must not be negative")
        conditions: list[ColumnElement[bool]] = [EntryRow.deleted.is_(False)]
        if text:
            pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace(
                "_", "\\_") + "%"
            conditions.append(or_(EntryRow.spiffe_id.ilike(pattern, escape="\\"),
                                  EntryRow.id == text))
        if parent_id:
            conditions.append(EntryRow.parent_id == parent_id)
        if selectors:
            conditions.append(_selector_filter(selectors, "superset"))
        page = (select(EntryRow).where(*conditions)
                .order_by(EntryRow.spiffe_id, EntryRow.id).offset(offset).limit(limit))
        total = select(func.count()).select_from(EntryRow).where(*conditions)
        with self._reading() as session:
            found = [_entry_record(row) for row in session.scalars(page)]
            return found, session.scalar(total) or 0

    def count_entries(self) -> int:
        """The number of live entries."""
        query = select(func.count()).select_from(EntryRow).where(EntryRow.deleted.is_(False))
        with self._reading() as session:
            return session.scalar(query) or 0

    def entries_by_parent(self, parent_ids: Collection[str]) -> list[RegistrationEntry]:
        """Live entries whose parent ID is one of ``parent_ids`` (an agent and its aliases)."""
        wanted = sorted(set(parent_ids))
        entries: list[RegistrationEntry] = []
        with self._reading() as session:
            for start in range(0, len(wanted), _IN_CHUNK):
                chunk = wanted[start : start + _IN_CHUNK]
                query = select(EntryRow).where(
                    EntryRow.parent_id.in_(chunk), EntryRow.deleted.is_(False)
                )
                entries.extend(_entry_record(row) for row in session.scalars(query))
        return sorted(entries, key=lambda entry: (entry.created_at, entry.id))

    def entries_changed_since(self, revision: int) -> list[RegistrationEntry]:
        """Live entries and tombstones whose revision is above ``revision``, in
        revision order. Purged tombstones are gone: see :meth:`purged_revision`."""
        query = select(EntryRow).where(EntryRow.revision > revision).order_by(EntryRow.revision)
        with self._reading() as session:
            return [_entry_record(row) for row in session.scalars(query)]

    def purge_tombstones(self, before_revision: int) -> int:
        """Forget tombstones older than ``before_revision``; returns how many."""
        with self._writing() as session:
            removed = session.connection().execute(
                delete(_table(EntryRow)).where(
                    EntryRow.deleted.is_(True), EntryRow.revision < before_revision
                )
            )
            session.execute(
                update(CounterRow)
                .where(CounterRow.name == TOMBSTONE_HORIZON, CounterRow.value < before_revision)
                .values(value=before_revision)
                .execution_options(synchronize_session=False)
            )
            return removed.rowcount

    def purged_revision(self) -> int:
        """The highest ``before_revision`` purged so far. A client last synced
        below it may have missed deletions and must sync in full."""
        with self._reading() as session:
            return _counter(session, TOMBSTONE_HORIZON)


def _audit_entry(
    session: Session, actor: str, action: str, entry_id: str, spiffe_id: str, at: datetime
) -> None:
    _append_audit(session, at, actor, action, entry_id, {"spiffe_id": spiffe_id})


def _live_key(spiffe_id: str, parent_id: str, selectors: tuple[Selector, ...]) -> str:
    """What makes a live entry unique, hashed so the unique index stays small."""
    canonical = json.dumps(
        [spiffe_id, parent_id, [[s.type, s.value] for s in selectors]],
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _live_entry(entry_id: str) -> ColumnElement[bool]:
    return and_(EntryRow.id == entry_id, EntryRow.deleted.is_(False))


def _entry_columns(entry: NewEntry) -> dict[str, Any]:
    return {
        "spiffe_id": entry.spiffe_id,
        "parent_id": entry.parent_id,
        "x509_svid_ttl": entry.x509_svid_ttl,
        "jwt_svid_ttl": entry.jwt_svid_ttl,
        "dns_names": list(entry.dns_names),
        "federates_with": list(entry.federates_with),
        "admin": entry.admin,
        "downstream": entry.downstream,
        "node": entry.node,
        "hint": entry.hint,
        "expires_at": entry.expires_at,
    }


def _insert_entry_selectors(
    session: Session, entry_id: str, selectors: tuple[Selector, ...]
) -> None:
    if selectors:
        session.execute(
            insert(EntrySelectorRow),
            [{"entry_id": entry_id, "type": s.type, "value": s.value} for s in selectors],
        )


def _refuse_duplicate_entry(session: Session, entry: NewEntry, key: str, entry_id: str) -> None:
    other = session.scalar(
        select(EntryRow.id).where(EntryRow.live_key == key, EntryRow.id != entry_id)
    )
    if other is not None:
        raise AlreadyExists(f"{_entry_conflict(entry)} (entry {other})")


def _entry_conflict(entry: NewEntry) -> str:
    return (
        f"an entry with SPIFFE ID {entry.spiffe_id}, parent ID {entry.parent_id} and the "
        "same selectors exists already; update that entry or use different selectors"
    )


def _entry_not_found(entry_id: str) -> NotFound:
    return NotFound(f"registration entry {entry_id} not found; list entries to see their IDs")


def _entry_record(row: EntryRow) -> RegistrationEntry:
    return RegistrationEntry(
        id=row.id,
        spiffe_id=row.spiffe_id,
        parent_id=row.parent_id,
        selectors=tuple(sorted(Selector(s.type, s.value) for s in row.selectors)),
        x509_svid_ttl=row.x509_svid_ttl,
        jwt_svid_ttl=row.jwt_svid_ttl,
        dns_names=tuple(row.dns_names),
        federates_with=tuple(row.federates_with),
        admin=row.admin,
        downstream=row.downstream,
        node=row.node,
        hint=row.hint,
        expires_at=row.expires_at,
        revision=row.revision,
        created_at=row.created_at,
        deleted=row.deleted,
    )


def _entry_record_from(
    entry_id: str,
    entry: NewEntry,
    selectors: tuple[Selector, ...],
    revision: int,
    created_at: datetime,
) -> RegistrationEntry:
    return RegistrationEntry(
        id=entry_id,
        spiffe_id=entry.spiffe_id,
        parent_id=entry.parent_id,
        selectors=selectors,
        x509_svid_ttl=entry.x509_svid_ttl,
        jwt_svid_ttl=entry.jwt_svid_ttl,
        dns_names=tuple(entry.dns_names),
        federates_with=tuple(entry.federates_with),
        admin=entry.admin,
        downstream=entry.downstream,
        node=entry.node,
        hint=entry.hint,
        expires_at=entry.expires_at,
        revision=revision,
        created_at=_stored_time(created_at),
    )


def _selector_filter(selectors: Sequence[Selector], match: str) -> ColumnElement[bool]:
    """Entries whose selector set relates to ``selectors`` as ``match`` says."""
    _check_choice("selector match", match, SELECTOR_MATCHES)
    wanted = _normalise(selectors)
    if not wanted:
        raise InvalidArgument("filtering by selectors needs at least one selector")

    def one_of(row: type[EntrySelectorRow]) -> ColumnElement[bool]:
        return or_(*(and_(row.type == s.type, row.value == s.value) for s in wanted))

    matched = aliased(EntrySelectorRow)
    sharing_any = select(matched.entry_id).where(one_of(matched))
    having_all = sharing_any.group_by(matched.entry_id).having(func.count() == len(wanted))
    extra = aliased(EntrySelectorRow)
    has_others = (
        select(extra.entry_id).where(extra.entry_id == EntryRow.id, not_(one_of(extra))).exists()
    )
    if match == "any":
        return EntryRow.id.in_(sharing_any)
    if match == "superset":
        return EntryRow.id.in_(having_all)
    if match == "subset":
        return and_(EntryRow.id.in_(sharing_any), not_(has_others))
    return and_(EntryRow.id.in_(having_all), not_(has_others))
