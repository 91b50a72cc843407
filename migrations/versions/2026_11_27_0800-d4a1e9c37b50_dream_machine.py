"""dream machine: Luma model names -> dreamq models, and the generations made through /dream-machine/v1

An existing deployment that already has the demo model gets the seed mapping (ray-2, ray-flash-2,
ray-1-6 -> demo); a fresh stack gets it from `dreamq up` once the demo model is pushed.

Revision ID: d4a1e9c37b50
Revises: 7e3b1f20c9a4
Create Date: 2026-11-27 08:00:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "d4a1e9c37b50"
down_revision = "7e3b1f20c9a4"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dream_machine_models",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("model_id", sa.UUID(), nullable=False),
        sa.Column("note", sa.Text(), server_default="", nullable=False),
        sa.Column("updated_by", sa.String(length=200), server_default="", nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_dream_machine_models_model_id_models")),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_dream_machine_models")),
    )
    op.create_table(
        "dream_machine_generations",
        sa.Column("job_id", sa.UUID(), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("generation_type", sa.String(length=32), nullable=False),
        sa.Column("model_name", sa.String(length=100), nullable=False),
        sa.Column(
            "request", postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_dream_machine_generations_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_dream_machine_generations_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_dream_machine_generations")),
    )
    op.create_index(
        "ix_dream_machine_generations_user_created",
        "dream_machine_generations",
        ["user_id", "created_at", "job_id"],
        unique=False,
        postgresql_where=sa.text("deleted_at IS NULL"),
    )
    op.execute(
        "INSERT INTO dream_machine_models (name, model_id, note, updated_by) "
        "SELECT n.name, m.id, 'seed', 'migration' FROM models m "
        "CROSS JOIN (VALUES ('ray-2'), ('ray-flash-2'), ('ray-1-6')) AS n(name) WHERE m.name = 'demo'"
    )


def downgrade() -> None:
    op.drop_index(
        "ix_dream_machine_generations_user_created",
        table_name="dream_machine_generations",
        postgresql_where=sa.text("deleted_at IS NULL"),
    )
    op.drop_table("dream_machine_generations")
    op.drop_table("dream_machine_models")
