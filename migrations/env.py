"""Alembic environment: async engine, batch mode on SQLite, URL from the caller.

Run through ``referral-service migrate`` (which passes the configured database URL), or
``alembic`` with ``-x url=...`` / ``REFERRAL_DATABASE_URL`` via alembic.ini.

On PostgreSQL the whole upgrade is one transaction holding an advisory lock: replicas that start
together (``serve --migrate``) migrate one after the other, and the later ones find the schema
at head and do nothing.
"""

from __future__ import annotations

import asyncio
import logging

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from referral_service.storage.tables import Base

config = context.config
target_metadata = Base.metadata
log = logging.getLogger("referral_service.migrate")

#: The advisory lock key of migrations ("REFMIGRA"): held for the upgrade's transaction.
MIGRATION_LOCK = 0x5245464D49475241


def _url() -> str:
    url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        from referral_service.config import Settings

        url = Settings().effective_database_url
    return str(url)


def _configure(connection: Connection | None = None, url: str | None = None) -> None:
    dialect = connection.dialect.name if connection is not None else (url or "").split(":", 1)[0]
    context.configure(
        connection=connection,
        url=url,
        target_metadata=target_metadata,
        render_as_batch=dialect.startswith("sqlite"),
        compare_type=True,
        literal_binds=connection is None,
    )


def run_migrations_offline() -> None:
    _configure(url=_url())
    with context.begin_transaction():
        context.run_migrations()


def _run_sync(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    url = _url()
    if url.startswith("sqlite"):
        from referral_service.storage.db import private_sqlite_file

        private_sqlite_file(url)  # 0600 in a 0700 directory, before SQLite creates it
    engine = create_async_engine(url, poolclass=pool.NullPool)
    async with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            await connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        elif connection.dialect.name == "postgresql":
            # Begins the transaction Alembic then runs in; released at its commit (or rollback).
            got = await connection.exec_driver_sql(f"SELECT pg_try_advisory_xact_lock({MIGRATION_LOCK})")
            if not got.scalar():
                log.info("another process is migrating the database; waiting for it to finish")
                await connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        await connection.run_sync(_run_sync)
        await connection.commit()
    await engine.dispose()


def run_migrations_online() -> None:
    asyncio.run(_run_async())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
