"""Email ownership and the mail queue: ``users.verify_time``; ``is_verified`` now means that the
owner proved the address, so the values set from the deliverability check (Hunter) are cleared;
single-use email tokens; the mail outbox.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from referral_service.storage.tables import Id, UTCDateTime

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("verify_time", UTCDateTime, nullable=True))
    # A deliverability verdict never proved ownership: everyone verifies from now on.
    op.execute(sa.text("UPDATE users SET is_verified = false"))
    op.create_table(
        "email_tokens",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("user_id", Id, nullable=False),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("code_hash", sa.String(64), nullable=True),
        sa.Column("code_failures", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("create_time", UTCDateTime, nullable=False),
        sa.Column("expire_time", UTCDateTime, nullable=False),
        sa.Column("use_time", UTCDateTime, nullable=True),
        sa.CheckConstraint(
            "purpose IN ('verify_email', 'password_reset')", name="ck_email_tokens_purpose_known"
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_email_tokens_user_id_users", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_email_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_email_tokens_token_hash"),
    )
    op.create_index("ix_email_tokens_expire_time", "email_tokens", ["expire_time"])
    op.create_index("ix_email_tokens_user_id_purpose", "email_tokens", ["user_id", "purpose"])
    op.create_table(
        "mail_outbox",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("user_id", Id, nullable=True),
        sa.Column("email_key", sa.String(320), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("message_id", sa.String(128), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_time", UTCDateTime, nullable=True),
        sa.Column("last_error", sa.String(200), nullable=True),
        sa.Column("create_time", UTCDateTime, nullable=False),
        sa.Column("update_time", UTCDateTime, nullable=False),
        sa.Column("send_time", UTCDateTime, nullable=True),
        sa.CheckConstraint(
            "state IN ('pending', 'sent', 'skipped', 'failed')", name="ck_mail_outbox_state_known"
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_mail_outbox_user_id_users", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_mail_outbox"),
    )
    op.create_index("ix_mail_outbox_state_next_attempt_time", "mail_outbox", ["state", "next_attempt_time"])


def downgrade() -> None:
    op.drop_index("ix_mail_outbox_state_next_attempt_time", table_name="mail_outbox")
    op.drop_table("mail_outbox")
    op.drop_index("ix_email_tokens_user_id_purpose", table_name="email_tokens")
    op.drop_index("ix_email_tokens_expire_time", table_name="email_tokens")
    op.drop_table("email_tokens")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("verify_time")
