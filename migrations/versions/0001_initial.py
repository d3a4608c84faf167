"""Initial schema: users, referral codes, refresh tokens, revocations, idempotency keys.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from referral_service.storage.tables import Id, UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("email_key", sa.String(320), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("is_active", sa.Boolean, nullable=False, server_default=sa.text("true")),
        sa.Column("is_verified", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.Column("is_superuser", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.Column(
            "referrer_id",
            Id,
            sa.ForeignKey("users.id", name="fk_users_referrer_id_users"),
            nullable=True,
        ),
        sa.Column("referral_code_id", Id, nullable=True),
        sa.Column("referral_count", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("create_time", UTCDateTime, nullable=False),
        sa.Column("update_time", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("email_key", name="uq_users_email_key"),
    )
    op.create_index("ix_users_referrer_id_id", "users", ["referrer_id", "id"])

    op.create_table(
        "referral_codes",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("code", sa.String(32), nullable=False),
        sa.Column("code_key", sa.String(32), nullable=False),
        sa.Column(
            "owner_id",
            Id,
            sa.ForeignKey("users.id", name="fk_referral_codes_owner_id_users"),
            nullable=False,
        ),
        sa.Column("create_time", UTCDateTime, nullable=False),
        sa.Column("expire_time", UTCDateTime, nullable=False),
        sa.Column("revoke_time", UTCDateTime, nullable=True),
        sa.Column("close_time", UTCDateTime, nullable=True),
        sa.Column("max_uses", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("use_count", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.PrimaryKeyConstraint("id", name="pk_referral_codes"),
        sa.UniqueConstraint("code_key", name="uq_referral_codes_code_key"),
        sa.CheckConstraint("max_uses >= 0", name="ck_referral_codes_max_uses_non_negative"),
        sa.CheckConstraint(
            "max_uses = 0 OR use_count <= max_uses", name="ck_referral_codes_use_count_within_max"
        ),
    )
    op.create_index(
        "uq_referral_codes_open_owner",
        "referral_codes",
        ["owner_id"],
        unique=True,
        sqlite_where=sa.text("close_time IS NULL"),
        postgresql_where=sa.text("close_time IS NULL"),
    )
    op.create_index("ix_referral_codes_owner_id_id", "referral_codes", ["owner_id", "id"])

    # users.referral_code_id -> referral_codes.id closes the cycle; batch mode lets SQLite add it.
    with op.batch_alter_table("users") as batch:
        batch.create_foreign_key(
            "fk_users_referral_code_id_referral_codes",
            "referral_codes",
            ["referral_code_id"],
            ["id"],
        )

    op.create_table(
        "refresh_tokens",
        sa.Column("jti", sa.String(64), nullable=False),
        sa.Column("session_id", sa.String(64), nullable=False),
        sa.Column(
            "user_id",
            Id,
            sa.ForeignKey("users.id", name="fk_refresh_tokens_user_id_users"),
            nullable=False,
        ),
        sa.Column("create_time", UTCDateTime, nullable=False),
        sa.Column("expire_time", UTCDateTime, nullable=False),
        sa.Column("used_time", UTCDateTime, nullable=True),
        sa.Column("revoke_time", UTCDateTime, nullable=True),
        sa.PrimaryKeyConstraint("jti", name="pk_refresh_tokens"),
    )
    op.create_index("ix_refresh_tokens_session_id", "refresh_tokens", ["session_id"])
    op.create_index("ix_refresh_tokens_user_id", "refresh_tokens", ["user_id"])

    op.create_table(
        "revocations",
        sa.Column("key", sa.String(80), nullable=False),
        sa.Column("expire_time", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_revocations"),
    )
    op.create_index("ix_revocations_expire_time", "revocations", ["expire_time"])

    op.create_table(
        "idempotency_keys",
        sa.Column("scope", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(36), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("resource_id", Id, nullable=False),
        sa.Column("create_time", UTCDateTime, nullable=False),
        sa.Column("expire_time", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("scope", "request_id", name="pk_idempotency_keys"),
    )
    op.create_index("ix_idempotency_keys_expire_time", "idempotency_keys", ["expire_time"])


def downgrade() -> None:
    op.drop_index("ix_idempotency_keys_expire_time", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    op.drop_index("ix_revocations_expire_time", table_name="revocations")
    op.drop_table("revocations")
    op.drop_index("ix_refresh_tokens_user_id", table_name="refresh_tokens")
    op.drop_index("ix_refresh_tokens_session_id", table_name="refresh_tokens")
    op.drop_table("refresh_tokens")
    with op.batch_alter_table("users") as batch:
        batch.drop_constraint("fk_users_referral_code_id_referral_codes", type_="foreignkey")
    op.drop_index("ix_referral_codes_owner_id_id", table_name="referral_codes")
    op.drop_index("uq_referral_codes_open_owner", table_name="referral_codes")
    op.drop_table("referral_codes")
    op.drop_index("ix_users_referrer_id_id", table_name="users")
    op.drop_table("users")
