"""Referral lifecycle and rewards (issue 17): referral states and fraud holds, conversions
reported by services, the append-only reward ledger and the per-referrer counters.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from referral_service.storage.tables import Id, UTCDateTime

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _user(column: str, table: str, *, primary: bool = False) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(
        column,
        Id,
        sa.ForeignKey("users.id", name=f"fk_{table}_{column}_users", ondelete="CASCADE"),
        nullable=False,
        **({"autoincrement": False} if primary else {}),
    )


def upgrade() -> None:
    op.create_table(
        "referral_states",
        _user("referee_id", "referral_states", primary=True),
        _user("referrer_id", "referral_states"),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("review", sa.String(16), nullable=True),
        sa.Column("signals", sa.String(256), nullable=True),
        sa.Column("review_note", sa.String(500), nullable=True),
        sa.Column("create_time", UTCDateTime, nullable=False),
        sa.Column("update_time", UTCDateTime, nullable=False),
        sa.Column("qualify_time", UTCDateTime, nullable=True),
        sa.Column("reward_time", UTCDateTime, nullable=True),
        sa.Column("review_time", UTCDateTime, nullable=True),
        sa.PrimaryKeyConstraint("referee_id", name="pk_referral_states"),
        sa.CheckConstraint(
            "state IN ('pending', 'qualified', 'rewarded', 'rejected')",
            name="ck_referral_states_state_known",
        ),
    )
    op.create_index("ix_referral_states_referrer_id_state", "referral_states", ["referrer_id", "state"])
    op.create_index(
        "ix_referral_states_review_held",
        "referral_states",
        ["referee_id"],
        sqlite_where=sa.text("review = 'held'"),
        postgresql_where=sa.text("review = 'held'"),
    )

    op.create_table(
        "conversions",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("source", Id, nullable=False),
        sa.Column("event_id", sa.String(128), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        _user("user_id", "conversions"),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("value_currency", sa.String(3), nullable=True),
        sa.Column("value_units", sa.BigInteger(), nullable=True),
        sa.Column("value_nanos", sa.Integer(), nullable=True),
        sa.Column("occur_time", UTCDateTime, nullable=False),
        sa.Column("create_time", UTCDateTime, nullable=False),
        sa.Column("reverse_time", UTCDateTime, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_conversions"),
    )
    op.create_index("uq_conversions_source_event_id", "conversions", ["source", "event_id"], unique=True)
    op.create_index("ix_conversions_user_id_id", "conversions", ["user_id", "id"])

    op.create_table(
        "reward_entries",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        _user("user_id", "reward_entries"),
        _user("referee_id", "reward_entries"),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("unit", sa.String(16), nullable=False),
        sa.Column("rule", sa.String(80), nullable=False),
        sa.Column(
            "conversion_id",
            Id,
            sa.ForeignKey(
                "conversions.id", name="fk_reward_entries_conversion_id_conversions", ondelete="CASCADE"
            ),
            nullable=True,
        ),
        sa.Column(
            "corrects_id",
            Id,
            sa.ForeignKey(
                "reward_entries.id", name="fk_reward_entries_corrects_id_reward_entries", ondelete="CASCADE"
            ),
            nullable=True,
        ),
        sa.Column("create_time", UTCDateTime, nullable=False),
        sa.Column("available_time", UTCDateTime, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_reward_entries"),
        sa.CheckConstraint("kind IN ('grant', 'cancel', 'clawback')", name="ck_reward_entries_kind_known"),
        sa.CheckConstraint(
            "(kind = 'grant') = (corrects_id IS NULL)", name="ck_reward_entries_corrections_name_a_grant"
        ),
        sa.CheckConstraint("(kind = 'grant') = (amount > 0)", name="ck_reward_entries_grants_positive"),
    )
    op.create_index("ix_reward_entries_user_id_id", "reward_entries", ["user_id", "id"])
    op.create_index("ix_reward_entries_conversion_id", "reward_entries", ["conversion_id"])
    op.create_index("uq_reward_entries_corrects_id", "reward_entries", ["corrects_id"], unique=True)

    op.create_table(
        "referrer_counters",
        _user("referrer_id", "referrer_counters", primary=True),
        sa.Column("period", sa.String(8), nullable=False),
        sa.Column("name", sa.String(48), nullable=False),
        sa.Column("value", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("referrer_id", "period", "name", name="pk_referrer_counters"),
    )
    op.create_index(
        "ix_referrer_counters_board", "referrer_counters", ["period", "name", "value", "referrer_id"]
    )


def downgrade() -> None:
    op.drop_table("referrer_counters")
    op.drop_table("reward_entries")
    op.drop_table("conversions")
    op.drop_table("referral_states")
