"""dispatch heads per model and tier-wide rate limits

Revision ID: 8634ed2e40a4
Revises: fca9cb510752
Create Date: 2026-11-27 00:07:04.072027
"""

import sqlalchemy as sa
from alembic import op

revision = "8634ed2e40a4"
down_revision = "fca9cb510752"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index(
        op.f("ix_jobs_queued_tier_created"), table_name="jobs", postgresql_where="((state)::text = 'queued'::text)"
    )
    op.drop_index(op.f("ix_jobs_queued_heads"), table_name="jobs", postgresql_where="((state)::text = 'queued'::text)")
    op.create_index(
        "ix_jobs_queued_heads",
        "jobs",
        ["model_id", "tier", "user_id", "created_at"],
        unique=False,
        postgresql_where=sa.text("state = 'queued'"),
    )
    op.create_index(
        "ix_jobs_queued_oldest",
        "jobs",
        ["model_id", "tier", "created_at"],
        unique=False,
        postgresql_where=sa.text("state = 'queued'"),
    )
    op.add_column("tiers", sa.Column("tier_rate_per_min", sa.Float(), nullable=True))
    op.add_column("tiers", sa.Column("tier_burst", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("tiers", "tier_burst")
    op.drop_column("tiers", "tier_rate_per_min")
    op.drop_index("ix_jobs_queued_oldest", table_name="jobs", postgresql_where=sa.text("state = 'queued'"))
    op.drop_index("ix_jobs_queued_heads", table_name="jobs", postgresql_where=sa.text("state = 'queued'"))
    op.create_index(
        op.f("ix_jobs_queued_heads"),
        "jobs",
        ["tier", "user_id", "created_at"],
        unique=False,
        postgresql_where="((state)::text = 'queued'::text)",
    )
    op.create_index(
        op.f("ix_jobs_queued_tier_created"),
        "jobs",
        ["tier", "created_at"],
        unique=False,
        postgresql_where="((state)::text = 'queued'::text)",
    )
