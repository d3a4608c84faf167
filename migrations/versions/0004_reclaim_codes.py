"""Owners may issue their own code again: a closed code may give its key up to a newer code of
the same owner (``code_key`` becomes nullable; only a closed code may lack one).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Batch mode: SQLite rebuilds the table (copying its rows, indexes and constraints);
    # PostgreSQL alters it in place.
    with op.batch_alter_table("referral_codes") as batch:
        batch.alter_column("code_key", existing_type=sa.String(32), nullable=True)
        batch.create_check_constraint(
            "ck_referral_codes_keyless_closed", "code_key IS NOT NULL OR close_time IS NOT NULL"
        )


def downgrade() -> None:
    # A code that gave its key to a newer issue gets a key nobody can type ('#' is not a code
    # character), so that the column can be NOT NULL again without a duplicate.
    op.execute(
        sa.text("UPDATE referral_codes SET code_key = '#' || CAST(id AS VARCHAR(20)) WHERE code_key IS NULL")
    )
    with op.batch_alter_table("referral_codes") as batch:
        batch.drop_constraint("ck_referral_codes_keyless_closed", type_="check")
        batch.alter_column("code_key", existing_type=sa.String(32), nullable=False)
