"""Database invariants every test of hostile input, outages and shutdown checks afterwards."""

from __future__ import annotations

from sqlalchemy import text

from referral_service.storage.db import Database

#: Each query returns the rows that break one invariant; all must be empty.
BROKEN = {
    "referral_count matches the referrals": """
        SELECT u.id FROM users u
        WHERE u.referral_count <> (SELECT COUNT(*) FROM users r WHERE r.referrer_id = u.id)""",
    "use_count matches the registrations with the code": """
        SELECT c.id FROM referral_codes c
        WHERE c.use_count <> (SELECT COUNT(*) FROM users u WHERE u.referral_code_id = c.id)""",
    "use_count within max_uses": """
        SELECT id FROM referral_codes WHERE max_uses > 0 AND use_count > max_uses""",
    "at most one open code per user": """
        SELECT owner_id FROM referral_codes WHERE close_time IS NULL
        GROUP BY owner_id HAVING COUNT(*) > 1""",
    "a referral's code belongs to its referrer": """
        SELECT u.id FROM users u LEFT JOIN referral_codes c ON c.id = u.referral_code_id
        WHERE (u.referrer_id IS NULL) <> (u.referral_code_id IS NULL)
           OR (u.referrer_id IS NOT NULL AND (c.id IS NULL OR c.owner_id <> u.referrer_id))""",
    "nobody refers themselves": "SELECT id FROM users WHERE referrer_id = id",
    "email keys are unique": """
        SELECT email_key FROM users GROUP BY email_key HAVING COUNT(*) > 1""",
    "codes are stored upper-case": "SELECT id FROM referral_codes WHERE code_key <> UPPER(code)",
    "a code is only ever its first owner's": """
        SELECT UPPER(code) FROM referral_codes GROUP BY UPPER(code) HAVING COUNT(DISTINCT owner_id) > 1""",
    "no user is privileged through the API": "SELECT id FROM users WHERE is_superuser",
    "sessions belong to users": """
        SELECT s.id FROM sessions s LEFT JOIN users u ON u.id = s.user_id WHERE u.id IS NULL""",
}


async def check_invariants(db: Database) -> None:
    broken: dict[str, list[object]] = {}
    async with db.read() as session:
        for name, query in BROKEN.items():
            rows = (await session.execute(text(query))).all()
            if rows:
                broken[name] = [row[0] for row in rows[:5]]
    assert not broken, f"database invariants broken: {broken}"


async def count_rows(db: Database, table: str) -> int:
    async with db.read() as session:
        return int((await session.execute(text(f"SELECT COUNT(*) FROM {table}"))).scalar_one())
