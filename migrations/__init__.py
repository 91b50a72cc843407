"""Alembic migrations: the only way the schema changes (`dreamq db upgrade`)."""
