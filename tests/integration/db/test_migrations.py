"""The schema changes only through Alembic, and the migrations match the models."""

from __future__ import annotations

from sqlalchemy import inspect

from app.core.config import get_settings
from app.db.migrate import check, current_revision, heads
from app.db.session import get_engine


def test_there_is_a_single_head():
    assert len(heads()) == 1


def test_database_is_at_head_and_models_match_migrations(stack_env):
    url = get_settings().database_url
    assert current_revision(url) == heads()[0]
    check(url)  # raises when autogenerate would find a difference


def test_backlog_heads_come_from_partial_indexes(stack_env):
    indexes = {ix["name"]: ix for ix in inspect(get_engine()).get_indexes("jobs")}
    assert indexes["ix_jobs_queued_heads"]["column_names"] == ["model_id", "tier", "user_id", "created_at"]
    assert "'queued'" in indexes["ix_jobs_queued_heads"]["dialect_options"]["postgresql_where"]
