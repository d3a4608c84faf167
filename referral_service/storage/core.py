"""What the repositories share: the tables as Core ``Table`` objects, typed bind parameters,
and the translation of unique violations into ``ports.Conflict``.

The repositories run Core statements on a bare ``AsyncConnection`` (no ORM session): most are
built once at import, with bind parameters, because building a statement and its cache key
costs more event-loop time than SQLite takes to run it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import BindParameter, CursorResult, Executable, bindparam
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from referral_service.domain import ports
from referral_service.storage.tables import Base, UTCDateTime

USERS = Base.metadata.tables["users"]
CODES = Base.metadata.tables["referral_codes"]
SESSIONS = Base.metadata.tables["sessions"]
SERVICE_ACCOUNTS = Base.metadata.tables["service_accounts"]
REVOCATIONS = Base.metadata.tables["revocations"]
REQUESTS = Base.metadata.tables["idempotency_keys"]
PROFILES = Base.metadata.tables["user_profiles"]
EMAIL_TOKENS = Base.metadata.tables["email_tokens"]
MAILS = Base.metadata.tables["mail_outbox"]
STATES = Base.metadata.tables["referral_states"]
CONVERSIONS = Base.metadata.tables["conversions"]
ENTRIES = Base.metadata.tables["reward_entries"]
COUNTERS = Base.metadata.tables["referrer_counters"]
EVENTS = Base.metadata.tables["events"]
EVENT_RETENTION = Base.metadata.tables["event_retention"]
WEBHOOK_ENDPOINTS = Base.metadata.tables["webhook_endpoints"]
WEBHOOK_DELIVERIES = Base.metadata.tables["webhook_deliveries"]
WEBHOOK_ATTEMPTS = Base.metadata.tables["webhook_attempts"]
WEBHOOK_DISPATCH = Base.metadata.tables["webhook_dispatch"]


def at(name: str = "now") -> BindParameter[datetime]:
    """A bind parameter for a time: aware UTC in Python, stored as the column stores it."""
    return bindparam(name, type_=UTCDateTime())


#: The conflicts of the port and the text each backend puts in its error message for them
#: (PostgreSQL names the constraint; SQLite names the columns).
_CONSTRAINTS = {
    ports.EMAIL_TAKEN: ("uq_users_email_key", "users.email_key"),
    ports.CODE_TAKEN: ("uq_referral_codes_code_key", "referral_codes.code_key"),
    ports.OPEN_CODE_EXISTS: ("uq_referral_codes_open_owner", "referral_codes.owner_id"),
    ports.REQUEST_ID_TAKEN: ("pk_idempotency_keys", "idempotency_keys.scope"),
    ports.SERVICE_ACCOUNT_TAKEN: ("uq_service_accounts_name", "service_accounts.name"),
    ports.CONVERSION_TAKEN: ("uq_conversions_source_event_id", "conversions.source"),
    ports.REWARD_CORRECTED: ("uq_reward_entries_corrects_id", "reward_entries.corrects_id"),
}
_UNIQUE_VIOLATION = ("UNIQUE constraint failed", "duplicate key value violates unique constraint")


def conflict(error: IntegrityError) -> ports.Conflict | None:
    """The port's ``Conflict`` for a unique violation of a constraint it names, else None."""
    text = str(error.orig)
    if not any(marker in text for marker in _UNIQUE_VIOLATION):
        return None
    for name, needles in _CONSTRAINTS.items():
        if any(needle in text for needle in needles):
            return ports.Conflict(name)
    return None


async def write(
    conn: AsyncConnection,
    statement: Executable,
    params: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
) -> CursorResult[Any]:
    """Execute a write whose unique violations become ``ports.Conflict``."""
    try:
        return await conn.execute(statement, params)
    except IntegrityError as error:
        found = conflict(error)
        if found is None:
            raise
        raise found from error
