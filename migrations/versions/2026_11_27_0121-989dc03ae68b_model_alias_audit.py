"""model alias audit

Revision ID: 989dc03ae68b
Revises: 8634ed2e40a4
Create Date: 2026-11-27 01:21:20.278143
"""

import sqlalchemy as sa
from alembic import op

revision = "989dc03ae68b"
down_revision = "8634ed2e40a4"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_alias_events",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("model_id", sa.UUID(), nullable=False),
        sa.Column("alias", sa.String(length=32), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("from_version_id", sa.UUID(), nullable=True),
        sa.Column("to_version_id", sa.UUID(), nullable=True),
        sa.Column("percent", sa.Float(), nullable=True),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "action IN ('promote', 'canary', 'clear', 'rollback', 'push')", name=op.f("ck_model_alias_events_action")
        ),
        sa.ForeignKeyConstraint(
            ["from_version_id"],
            ["model_versions.id"],
            name=op.f("fk_model_alias_events_from_version_id_model_versions"),
        ),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_model_alias_events_model_id_models")),
        sa.ForeignKeyConstraint(
            ["to_version_id"], ["model_versions.id"], name=op.f("fk_model_alias_events_to_version_id_model_versions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_alias_events")),
    )
    op.create_index(
        "ix_model_alias_events_model_alias_at", "model_alias_events", ["model_id", "alias", "at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_model_alias_events_model_alias_at", table_name="model_alias_events")
    op.drop_table("model_alias_events")
