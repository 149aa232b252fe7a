"""The server's datastore under its first name: :class:`Datastore` is
:class:`ca.datastore.sql.SqlDatastore`, so ``Datastore.open(url, clock=...)``
keeps working. Code that takes a store is typed against the Protocol,
:class:`ca.datastore.interface.Datastore`.
"""

from __future__ import annotations

from ca.datastore.interface import AgentChangeListener
from ca.datastore.sql import SqlDatastore

Datastore = SqlDatastore

__all__ = ["AgentChangeListener", "Datastore", "SqlDatastore"]
