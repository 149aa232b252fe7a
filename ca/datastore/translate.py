"""The one place where SQLAlchemy's errors become Tessera's.

Every call into the database runs inside :func:`translate_errors`::

    with translate_errors(conflict="an entry like this exists already"):
        ...

- ``IntegrityError`` (a unique or foreign key constraint) -> :class:`AlreadyExists`
  with the caller's ``conflict`` message;
- connection, operational and pool errors -> :class:`Unavailable`;
- ``DataError`` (a value the database cannot store) -> :class:`InvalidArgument`;
- anything else from SQLAlchemy -> :class:`CAError` (a bug or a damaged database).

Tessera's own errors pass through untouched, also when SQLAlchemy wrapped one
raised while binding a value. No SQLAlchemy exception leaves this boundary.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import exc as sa_exc

from ca.errors import CAError
from sdk.errors import AlreadyExists, InvalidArgument, TesseraError, Unavailable

UNAVAILABLE_HINT = "check that the database is running and the URL is right"


def unavailable(reason: str) -> Unavailable:
    return Unavailable(f"the datastore is unavailable: {reason}; {UNAVAILABLE_HINT}")


def reason_of(error: BaseException) -> str:
    """The first line of the driver's own message, which is what a user can act on."""
    cause = error.orig if isinstance(error, sa_exc.DBAPIError) and error.orig else error
    text = str(cause).strip().splitlines()
    return text[0].strip() if text else type(cause).__name__


@contextmanager
def translate_errors(*, conflict: str = "the record exists already") -> Iterator[None]:
    try:
        yield
    except sa_exc.IntegrityError as error:
        raise AlreadyExists(conflict) from error
    except (
        sa_exc.OperationalError,
        sa_exc.InterfaceError,
        sa_exc.DisconnectionError,
        sa_exc.TimeoutError,
    ) as error:
        raise unavailable(reason_of(error)) from error
    except sa_exc.DataError as error:
        raise InvalidArgument(f"the datastore refused a value: {reason_of(error)}") from error
    except sa_exc.StatementError as error:
        if isinstance(error.orig, TesseraError):
            raise error.orig from error
        if isinstance(error.orig, ValueError | TypeError):
            raise InvalidArgument(f"the datastore refused a value: {error.orig}") from error
        raise CAError(f"the datastore failed: {reason_of(error)}") from error
    except sa_exc.SQLAlchemyError as error:
        raise CAError(f"the datastore failed: {reason_of(error)}") from error
