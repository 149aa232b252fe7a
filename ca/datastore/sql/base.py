"""The SQL datastore's base: engines, sessions (where SQLAlchemy errors are
translated), open/close/ping, agent-change listeners and the helpers every
kind of record uses."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

from sqlalchemy import Insert, Table, bindparam, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, sessionmaker

from attestor.selector import Selector
from ca.datastore.engine import Engines, create_engines
from ca.datastore.interface import AgentChangeListener
from ca.datastore.migrate import upgrade
from ca.datastore.schema import AGENT_CHANGES, CounterRow
from ca.datastore.translate import translate_errors
from sdk.clock import SYSTEM_CLOCK, Clock
from sdk.errors import InvalidArgument, Unavailable


class SqlBase:
    """The engines, the session boundary and the agent-change listeners every
    kind of record shares; :class:`~ca.datastore.sql.SqlDatastore` composes the rest."""

    def __init__(self, engines: Engines, clock: Clock) -> None:
        self._engines = engines
        self._clock = clock
        self._reads = sessionmaker(bind=engines.reads, expire_on_commit=False, autoflush=False)
        self._writes = sessionmaker(bind=engines.writes, expire_on_commit=False, autoflush=False)
        self._closed = False
        self._agent_listeners: list[AgentChangeListener] = []

    @classmethod
    def open(cls, url: str, *, clock: Clock = SYSTEM_CLOCK) -> Self:
        """Connect, create or migrate the schema, and return the store.

        ConfigError for a bad URL or an unwritable SQLite path, Unavailable when
        the database does not answer, FailedPrecondition for a schema newer
        than this Tessera.
        """
        engines = create_engines(url)
        try:
            with translate_errors():
                upgrade(engines.writes)
        except BaseException:
            engines.engine.dispose()
            raise
        return cls(engines, clock)

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._engines.dialect

    def close(self) -> None:
        """Close every pooled connection; later calls raise Unavailable."""
        self._closed = True
        with translate_errors():
            self._engines.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def ping(self) -> None:
        """Return when the database answers; Unavailable otherwise."""
        with self._reading() as session:
            session.execute(text("SELECT 1"))

    # -- sessions: the one boundary where SQLAlchemy errors are translated -----

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        self._check_open()
        with translate_errors(), self._reads.begin() as session:
            yield session

    @contextmanager
    def _writing(self, *, conflict: str = "the record exists already") -> Iterator[Session]:
        self._check_open()
        with translate_errors(conflict=conflict), self._writes.begin() as session:
            yield session

    @contextmanager
    def _writing_core(self, *, conflict: str = "the record exists already") -> Iterator[Connection]:
        """A write transaction on a bare connection, for Core statements only: no ORM
        session to set up and tear down (what every issuance writes through)."""
        self._check_open()
        with translate_errors(conflict=conflict), self._engines.writes.begin() as connection:
            yield connection

    @contextmanager
    def _changing_agent(self, spiffe_id: str) -> Iterator[Session]:
        """A write transaction changing the agent: it bumps the agents counter when the
        body succeeds, and the listeners hear of it once the transaction has ended."""
        value: int | None = None
        try:
            with self._writing() as session:
                yield session
                bumped = _bump(session, AGENT_CHANGES)
            value = bumped
        finally:
            for listener in self._agent_listeners:
                listener(spiffe_id, value)

    def on_agent_change(self, listener: AgentChangeListener) -> None:
        """Call ``listener`` after every agent change made through this store, in the
        thread that made it; it must be quick and must not raise."""
        self._agent_listeners.append(listener)

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the datastore is closed; the server is shutting down")


# -- helpers ---------------------------------------------------------------------


def _bump(session: Session, name: str) -> int:
    """Increment a counter in the caller's transaction; the row lock this takes
    on PostgreSQL makes concurrent writers queue until the first commits."""
    statement = (
        update(CounterRow)
        .where(CounterRow.name == name)
        .values(value=CounterRow.value + 1)
        .returning(CounterRow.value)
        .execution_options(synchronize_session=False)
    )
    return int(session.execute(statement).scalar_one())


def _counter(session: Session | Connection, name: str) -> int:
    """A counter's value, read in the caller's transaction (a statement built once: the
    entry revision is read for every issuance)."""
    connection = session.connection() if isinstance(session, Session) else session
    return int(connection.execute(_COUNTER, {"name": name}).scalar_one())


_COUNTER = select(CounterRow.value).where(CounterRow.name == bindparam("name"))


def _table(model: type[Any]) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


def _insert_on_conflict(
    dialect: str,
    model: type[Any],
    values: Mapping[str, Any],
    *,
    keys: Sequence[str],
    changes: Mapping[str, Any] | None = None,
) -> Insert:
    """INSERT ... ON CONFLICT (keys) DO UPDATE SET changes (or DO NOTHING):
    an upsert that is safe against a concurrent insert of the same key. Each dialect's
    module is imported when first used: a SQLite server never loads PostgreSQL's
    (about 30 ms of every start)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        pg_insert = postgresql.insert(_table(model)).values(dict(values))
        if changes is None:
            return pg_insert.on_conflict_do_nothing(index_elements=list(keys))
        return pg_insert.on_conflict_do_update(index_elements=list(keys), set_=dict(changes))
    from sqlalchemy.dialects import sqlite

    lite_insert = sqlite.insert(_table(model)).values(dict(values))
    if changes is None:
        return lite_insert.on_conflict_do_nothing(index_elements=list(keys))
    return lite_insert.on_conflict_do_update(index_elements=list(keys), set_=dict(changes))


def _normalise(selectors: Sequence[Selector]) -> tuple[Selector, ...]:
    return tuple(sorted(set(selectors)))


def _check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise InvalidArgument(f"{what} {value!r} is not one of {', '.join(choices)}")


def _stored_time(value: datetime) -> datetime:
    """A time as the store gives it back: aware, in UTC (naive ones are refused)."""
    if value.tzinfo is None:
        raise InvalidArgument("naive datetime given to the datastore; pass a UTC-aware one")
    return value.astimezone(UTC)
