"""maintenance indexes: in-flight jobs by lease, expiring outputs and uploads

Revision ID: 7e3b1f20c9a4
Revises: 5c0e7a4d91b2
Create Date: 2026-11-27 04:50:00
"""

import sqlalchemy as sa
from alembic import op

revision = "7e3b1f20c9a4"
down_revision = "5c0e7a4d91b2"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_jobs_in_flight_updated",
        "jobs",
        ["updated_at"],
        unique=False,
        postgresql_where=sa.text("state IN ('dispatched','running')"),
    )
    op.create_index(
        "ix_jobs_outputs_finished",
        "jobs",
        ["finished_at"],
        unique=False,
        postgresql_where=sa.text("video_key IS NOT NULL"),
    )
    op.create_index("ix_uploads_expires_at", "uploads", ["expires_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_uploads_expires_at", table_name="uploads")
    op.drop_index("ix_jobs_outputs_finished", table_name="jobs", postgresql_where=sa.text("video_key IS NOT NULL"))
    op.drop_index(
        "ix_jobs_in_flight_updated", table_name="jobs", postgresql_where=sa.text("state IN ('dispatched','running')")
    )
