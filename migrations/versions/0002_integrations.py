"""Integrations: the email verification outcome on users, and user_profiles (enrichment jobs
and their results).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from referral_service.storage.tables import Id, UTCDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("email_verification", sa.String(16), nullable=True))
        batch.add_column(sa.Column("email_verify_time", UTCDateTime, nullable=True))

    op.create_table(
        "user_profiles",
        sa.Column(
            "user_id",
            Id,
            sa.ForeignKey("users.id", name="fk_user_profiles_user_id_users", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("next_attempt_time", UTCDateTime, nullable=True),
        sa.Column("full_name", sa.String(200), nullable=True),
        sa.Column("company", sa.String(200), nullable=True),
        sa.Column("title", sa.String(200), nullable=True),
        sa.Column("location", sa.String(200), nullable=True),
        sa.Column("avatar_uri", sa.String(2048), nullable=True),
        sa.Column("source", sa.String(32), nullable=True),
        sa.Column("fetch_time", UTCDateTime, nullable=True),
        sa.Column("last_error", sa.String(200), nullable=True),
        sa.Column("create_time", UTCDateTime, nullable=False),
        sa.Column("update_time", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("user_id", name="pk_user_profiles"),
        sa.CheckConstraint(
            "state IN ('pending', 'found', 'not_found', 'failed')",
            name="ck_user_profiles_state_known",
        ),
    )
    op.create_index(
        "ix_user_profiles_state_next_attempt_time", "user_profiles", ["state", "next_attempt_time"]
    )


def downgrade() -> None:
    op.drop_index("ix_user_profiles_state_next_attempt_time", table_name="user_profiles")
    op.drop_table("user_profiles")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("email_verify_time")
        batch.drop_column("email_verification")
