"""Service accounts: internal services' client credentials (a keyed hash of the secret) and
their scopes.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from referral_service.storage.tables import Id, UTCDateTime

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "service_accounts",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("secret_hash", sa.String(128), nullable=False),
        sa.Column("scopes", sa.String(512), nullable=False),
        sa.Column("create_time", UTCDateTime, nullable=False),
        sa.Column("revoke_time", UTCDateTime, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_service_accounts"),
        sa.UniqueConstraint("name", name="uq_service_accounts_name"),
        sa.UniqueConstraint("client_id", name="uq_service_accounts_client_id"),
    )


def downgrade() -> None:
    op.drop_table("service_accounts")
