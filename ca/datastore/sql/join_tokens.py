"""Join tokens."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from ca.datastore.records import JoinToken
from ca.datastore.schema import JoinTokenRow
from ca.datastore.sql.base import SqlBase, _stored_time, _table
from sdk.errors import FailedPrecondition, NotFound


class JoinTokensMixin(SqlBase):
    """:class:`~ca.datastore.interface.JoinTokenStore` on SQL."""

    def create_join_token(
        self, token: str, *, alias_id: str | None, expires_at: datetime
    ) -> JoinToken:
        with self._writing(conflict="this join token exists already; generate another") as session:
            session.execute(
                insert(JoinTokenRow).values(token=token, alias_id=alias_id, expires_at=expires_at)
            )
        return JoinToken(token=token, alias_id=alias_id, expires_at=_stored_time(expires_at))

    def find_join_token(self, token: str) -> JoinToken:
        """An unused, unexpired join token, left unused (:meth:`register_agent` redeems it).

        NotFound if unknown or used already; FailedPrecondition if expired.
        """
        with self._reading() as session:
            row = session.get(JoinTokenRow, token)
            found = (
                None
                if row is None
                else JoinToken(token=token, alias_id=row.alias_id, expires_at=row.expires_at)
            )
        if found is None:
            raise _join_token_not_found()
        if found.expires_at <= self._clock.now():
            raise _join_token_expired(found.expires_at)
        return found

    def consume_join_token(self, token: str) -> JoinToken:
        """Use a join token up: it is deleted whatever happens next.

        NotFound if unknown or used already; FailedPrecondition if expired
        (an expired token is deleted as well).
        """
        with self._writing() as session:
            row = session.execute(
                delete(JoinTokenRow)
                .where(JoinTokenRow.token == token)
                .returning(JoinTokenRow.alias_id, JoinTokenRow.expires_at)
                .execution_options(synchronize_session=False)
            ).first()
        if row is None:
            raise _join_token_not_found()
        consumed = JoinToken(token=token, alias_id=row.alias_id, expires_at=row.expires_at)
        if consumed.expires_at <= self._clock.now():
            raise _join_token_expired(consumed.expires_at)
        return consumed

    def list_join_tokens(self) -> list[JoinToken]:
        query = select(JoinTokenRow).order_by(JoinTokenRow.expires_at, JoinTokenRow.token)
        with self._reading() as session:
            return [
                JoinToken(token=row.token, alias_id=row.alias_id, expires_at=row.expires_at)
                for row in session.scalars(query)
            ]

    def prune_join_tokens(self) -> int:
        """Delete expired join tokens; returns how many."""
        with self._writing() as session:
            result = session.connection().execute(
                delete(_table(JoinTokenRow)).where(JoinTokenRow.expires_at <= self._clock.now())
            )
            return result.rowcount


def _join_token_not_found() -> NotFound:
    return NotFound(
        "join token not found or already used; generate a new one with "
        "'tessera server token generate'"
    )


def _join_token_expired(expires_at: datetime) -> FailedPrecondition:
    return FailedPrecondition(
        f"join token expired at {expires_at.isoformat()}; generate a new one "
        "with 'tessera server token generate'"
    )


def _redeem_join_token(session: Session, token: str, now: datetime) -> None:
    """Delete an unexpired join token in ``session``'s transaction; refuse it otherwise.

    The DELETE locks the row: of two attestations with one token, the second finds
    nothing once the first commits (or the token again, if the first rolled back)."""
    row = session.execute(
        delete(JoinTokenRow)
        .where(JoinTokenRow.token == token)
        .returning(JoinTokenRow.expires_at)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        raise _join_token_not_found()
    if row.expires_at <= now:
        raise _join_token_expired(row.expires_at)
