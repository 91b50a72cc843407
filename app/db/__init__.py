"""Data layer: typed SQLAlchemy models and the one place sessions are created and committed."""
