"""Sessions as rows: one row per login session holding its current refresh token and its
durable revoked state, replacing one row per refresh token (``refresh_tokens``).

A refresh and a revocation of the same session now update the same row, so they serialise on
its lock (on PostgreSQL a refresh racing a logout could insert a token the logout never saw).
Used refresh tokens are no longer kept: a presented token that is not the session's current
one is a reuse.

Existing sessions are carried over: the newest token of each becomes its current token, the
session is revoked if any of its tokens was (or if its newest token was already used), and it
expires with its newest token.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from referral_service.storage.tables import Id, UTCDateTime

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CARRY_OVER = """
INSERT INTO sessions (id, user_id, refresh_jti, create_time, refresh_time, expire_time,
                      revoke_time, revoke_reason)
SELECT s.session_id, latest.user_id, latest.jti, s.first_create,
       CASE WHEN s.tokens > 1 THEN latest.create_time END,
       latest.expire_time,
       COALESCE(s.first_revoke, latest.used_time),
       CASE WHEN s.first_revoke IS NOT NULL OR latest.used_time IS NOT NULL THEN 'logout' END
FROM (
    SELECT session_id, MIN(create_time) AS first_create, MAX(create_time) AS last_create,
           MIN(revoke_time) AS first_revoke, COUNT(*) AS tokens
    FROM refresh_tokens GROUP BY session_id
) AS s
JOIN refresh_tokens AS latest ON latest.jti = (
    SELECT MAX(r.jti) FROM refresh_tokens AS r
    WHERE r.session_id = s.session_id AND r.create_time = s.last_create
)
"""

_CARRY_BACK = """
INSERT INTO refresh_tokens (jti, session_id, user_id, create_time, expire_time, used_time,
                            revoke_time)
SELECT refresh_jti, id, user_id, COALESCE(refresh_time, create_time), expire_time, NULL,
       revoke_time
FROM sessions
"""


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column(
            "user_id",
            Id,
            sa.ForeignKey("users.id", name="fk_sessions_user_id_users"),
            nullable=False,
        ),
        sa.Column("refresh_jti", sa.String(64), nullable=False),
        sa.Column("create_time", UTCDateTime, nullable=False),
        sa.Column("refresh_time", UTCDateTime, nullable=True),
        sa.Column("expire_time", UTCDateTime, nullable=False),
        sa.Column("revoke_time", UTCDateTime, nullable=True),
        sa.Column("revoke_reason", sa.String(16), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_sessions"),
    )
    op.create_index("ix_sessions_expire_time", "sessions", ["expire_time"])
    op.create_index(
        "ix_sessions_live_user",
        "sessions",
        ["user_id", "create_time"],
        sqlite_where=sa.text("revoke_time IS NULL"),
        postgresql_where=sa.text("revoke_time IS NULL"),
    )
    op.execute(_CARRY_OVER)
    op.drop_index("ix_refresh_tokens_user_id", table_name="refresh_tokens")
    op.drop_index("ix_refresh_tokens_session_id", table_name="refresh_tokens")
    op.drop_table("refresh_tokens")


def downgrade() -> None:
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
    op.execute(_CARRY_BACK)
    op.drop_index("ix_sessions_live_user", table_name="sessions")
    op.drop_index("ix_sessions_expire_time", table_name="sessions")
    op.drop_table("sessions")
