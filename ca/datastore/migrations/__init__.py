"""Alembic migrations of the datastore schema; run by :func:`ca.datastore.migrate.upgrade`."""
