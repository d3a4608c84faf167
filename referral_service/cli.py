"""``referral-service`` console command: ``serve``, ``migrate``, ``create-superuser``, and the
service accounts (``create-service-account``, ``list-service-accounts``, ``revoke-service-account``).

Flags override the matching ``REFERRAL_*`` environment variables.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from referral_service import logs
from referral_service.app import StartupError
from referral_service.config import Settings, describe

if TYPE_CHECKING:
    from referral_service.domain.errors import DomainError

log = logging.getLogger("referral_service")


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for name in (
        "grpc_host",
        "grpc_port",
        "http_host",
        "http_port",
        "database_url",
        "redis_url",
        "data_dir",
        "log_level",
        "log_format",
        "workers",
    ):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return Settings(**overrides)


def _report(error: DomainError) -> None:
    """A refused command: its message and the field violations, on standard error."""
    print(f"error: {error.message}", file=sys.stderr)
    for violation in error.violations:
        print(f"  {violation.field}: {violation.description}", file=sys.stderr)


async def _create_superuser(settings: Settings, email: str, password: str, *, promote_existing: bool) -> int:
    from referral_service.app import build_app
    from referral_service.domain.errors import DomainError

    app = await build_app(settings.replace(grpc_port=0, http_enabled=False))
    try:
        user, created = await app.auth.create_superuser(email, password, promote_existing=promote_existing)
    except DomainError as error:
        _report(error)
        return 1
    finally:
        await app.stop(0, drain=0)
    if created:
        print(f"created superuser id={user.id} email={user.email}")
    else:
        print(
            f"promoted existing user id={user.id} email={user.email} to superuser: its password is "
            "now the one given and all of its sessions were revoked"
        )
    return 0


async def _service_accounts(settings: Settings, args: argparse.Namespace) -> int:
    import json

    from referral_service.app import build_app
    from referral_service.domain.errors import DomainError

    app = await build_app(settings.replace(grpc_port=0, http_enabled=False))
    accounts = app.services.service_accounts
    try:
        if args.command == "create-service-account":
            account, secret = await accounts.create(args.name, args.scopes)
            if args.json:
                print(json.dumps({"client_id": account.client_id, "client_secret": secret}))
            else:
                print(f"created service account {account.name} with scopes: {' '.join(account.scopes)}")
                print(f"client_id:     {account.client_id}")
                print(f"client_secret: {secret}")
                print("The secret is shown only now: store it in the service's secret store.")
        elif args.command == "list-service-accounts":
            found = await accounts.list()
            rows = [
                {
                    "name": account.name,
                    "client_id": account.client_id,
                    "scopes": list(account.scopes),
                    "create_time": account.create_time.isoformat(),
                    "revoke_time": account.revoke_time.isoformat() if account.revoke_time else None,
                }
                for account in found
            ]
            if args.json:
                print(json.dumps(rows))
            else:
                for account in found:
                    state = f"revoked {account.revoke_time.isoformat()}" if account.revoke_time else "active"
                    print(f"{account.name}\t{account.client_id}\t{' '.join(account.scopes)}\t{state}")
        else:
            account = await accounts.revoke(args.name)
            print(f"revoked service account {account.name}: its tokens no longer work")
    except DomainError as error:
        _report(error)
        return 1
    finally:
        await app.stop(0, drain=0)
    return 0


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    from_env = os.environ.get("REFERRAL_SUPERUSER_PASSWORD")
    if from_env:
        return from_env
    first = getpass.getpass("Password: ")
    if getpass.getpass("Repeat password: ") != first:
        raise SystemExit("error: passwords differ")
    return first


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="referral-service", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database-url", dest="database_url", help="REFERRAL_DATABASE_URL")
    common.add_argument("--redis-url", dest="redis_url", help="REFERRAL_REDIS_URL")
    common.add_argument("--data-dir", dest="data_dir", help="REFERRAL_DATA_DIR")
    common.add_argument("--log-level", dest="log_level", help="REFERRAL_LOG_LEVEL")
    common.add_argument(
        "--log-format", dest="log_format", choices=["text", "json"], help="REFERRAL_LOG_FORMAT"
    )
    commands = root.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", parents=[common], help="serve gRPC and HTTP/JSON")
    serve.add_argument("--host", dest="grpc_host", help="REFERRAL_GRPC_HOST (default 127.0.0.1)")
    serve.add_argument("--port", dest="grpc_port", type=int, help="REFERRAL_GRPC_PORT (default 50051)")
    serve.add_argument("--http-host", dest="http_host", help="REFERRAL_HTTP_HOST (default 127.0.0.1)")
    serve.add_argument(
        "--http-port", dest="http_port", type=int, help="REFERRAL_HTTP_PORT (default 8080; 0 picks one)"
    )
    serve.add_argument("--migrate", action="store_true", help="apply migrations before serving")
    serve.add_argument(
        "--workers", dest="workers", type=int, help="REFERRAL_WORKERS: server processes (default: cores)"
    )

    commands.add_parser("migrate", parents=[common], help="apply database migrations")

    superuser = commands.add_parser(
        "create-superuser",
        parents=[common],
        help="create a superuser (an existing account is refused unless --promote-existing)",
    )
    superuser.add_argument("--email", required=True)
    superuser.add_argument(
        "--promote-existing",
        action="store_true",
        help="if an account with this email exists, make it a superuser, set its password to the "
        "one given and revoke all of its sessions (else an existing account is an error)",
    )
    superuser.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from standard input (else REFERRAL_SUPERUSER_PASSWORD, else a prompt)",
    )

    create = commands.add_parser(
        "create-service-account",
        parents=[common],
        help="create a service account and print its client_id and client_secret (shown once)",
    )
    create.add_argument("name", help="a unique name: lower-case letters, digits, '.', '_', '-'")
    create.add_argument(
        "--scope",
        dest="scopes",
        action="append",
        required=True,
        help="a scope to grant (repeat for several): users:register, users:read, referrals:read, "
        "tokens:introspect, sessions:revoke",
    )
    create.add_argument("--json", action="store_true", help='print {"client_id": ..., "client_secret": ...}')
    listing = commands.add_parser("list-service-accounts", parents=[common], help="list the service accounts")
    listing.add_argument("--json", action="store_true", help="print a JSON list")
    revoke = commands.add_parser(
        "revoke-service-account",
        parents=[common],
        help="revoke a service account: its tokens stop working at once, everywhere",
    )
    revoke.add_argument("name")
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ValidationError as error:
        print("configuration error:", file=sys.stderr)
        for problem in describe(error):
            print(f"  {problem}", file=sys.stderr)
        return 2
    logs.configure(settings.logging.level, settings.logging.format.value)
    try:
        if args.command == "serve":
            from referral_service.supervisor import run_event_loop, serve, serve_workers

            workers = settings.effective_workers
            if workers > 1:
                if args.migrate:
                    from referral_service.storage import migrate

                    migrate.upgrade(settings.effective_database_url)
                return serve_workers(settings, workers)
            run_event_loop(settings, serve(settings, args.migrate))
            return 0
        if args.command == "migrate":
            from referral_service.storage import migrate

            migrate.upgrade(settings.effective_database_url)
            log.info("database is at the latest migration")
            return 0
        if args.command in ("create-service-account", "list-service-accounts", "revoke-service-account"):
            return asyncio.run(_service_accounts(settings, args))
        if args.command == "create-superuser":
            return asyncio.run(
                _create_superuser(
                    settings, args.email, _read_password(args), promote_existing=args.promote_existing
                )
            )
    except KeyboardInterrupt:
        return 130
    except StartupError as error:
        log.error("%s", error)
        return 1
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
