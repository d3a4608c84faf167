"""Events: the transactional outbox (``events``, one row per event, its cursor never reused)
and the retention watermark (``event_retention``).

Revision ID: 0008
Revises: 0006
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from referral_service.storage.tables import Id, UTCDateTime

revision: str = "0008"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("cursor", Id, autoincrement=True, nullable=False),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("time", UTCDateTime, nullable=False),
        sa.Column("data", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("cursor", name="pk_events"),
        sa.UniqueConstraint("id", name="uq_events_id"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_events_time", "events", ["time"])
    op.create_table(
        "event_retention",
        sa.Column("id", sa.Integer, autoincrement=False, nullable=False),
        sa.Column("purged_through", sa.BigInteger, server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_event_retention"),
    )
    op.execute("INSERT INTO event_retention (id, purged_through) VALUES (1, 0)")


def downgrade() -> None:
    op.drop_table("event_retention")
    op.drop_index("ix_events_time", table_name="events")
    op.drop_table("events")
