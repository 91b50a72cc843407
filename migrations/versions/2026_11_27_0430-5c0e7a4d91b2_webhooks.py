"""webhooks: per-job events filter, delivery log, admin allow-list, per-user signing secret

users.webhook_secret is added with a volatile default, so Postgres fills every existing user
with its own random secret (a table rewrite; users is small).

Revision ID: 5c0e7a4d91b2
Revises: 989dc03ae68b
Create Date: 2026-11-27 04:30:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "5c0e7a4d91b2"
down_revision = "989dc03ae68b"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "webhook_allowlist",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("network", postgresql.CIDR(), nullable=True),
        sa.Column("host", sa.String(length=253), nullable=True),
        sa.Column("port", sa.Integer(), nullable=True),
        sa.Column("note", sa.Text(), server_default="", nullable=False),
        sa.Column("created_by", sa.String(length=200), server_default="", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("(network IS NULL) <> (host IS NULL)", name=op.f("ck_webhook_allowlist_network_or_host")),
        sa.CheckConstraint("port IS NULL OR (port BETWEEN 1 AND 65535)", name=op.f("ck_webhook_allowlist_port_range")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_allowlist")),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("job_id", sa.UUID(), nullable=False),
        sa.Column("event", sa.String(length=16), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column(
            "payload", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False
        ),
        sa.Column("status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("event IN ('started','progress','completed')", name=op.f("ck_webhook_deliveries_event")),
        sa.CheckConstraint("status IN ('pending','delivered','failed')", name=op.f("ck_webhook_deliveries_status")),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_webhook_deliveries_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
    )
    op.create_index(op.f("ix_webhook_deliveries_job_id"), "webhook_deliveries", ["job_id"], unique=False)
    op.create_index(
        "ix_webhook_deliveries_pending",
        "webhook_deliveries",
        ["next_attempt_at"],
        unique=False,
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.add_column("jobs", sa.Column("webhook_events", postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.add_column(
        "users",
        sa.Column(
            "webhook_secret",
            sa.String(length=64),
            server_default=sa.text("replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '')"),
            nullable=False,
        ),
    )


def downgrade() -> None:
    op.drop_column("users", "webhook_secret")
    op.drop_column("jobs", "webhook_events")
    op.drop_index(
        "ix_webhook_deliveries_pending", table_name="webhook_deliveries", postgresql_where=sa.text("status = 'pending'")
    )
    op.drop_index(op.f("ix_webhook_deliveries_job_id"), table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_allowlist")
