"""``referral-service`` console command: ``serve``, ``migrate``, ``health``, ``create-superuser``,
and the service accounts (``create-service-account``, ``list-service-accounts``,
``revoke-service-account``). Flags override the matching ``REFERRAL_*`` environment variables.

Exit codes: 0 done; 1 a failure at run time (the database unreachable, a port in use), said in
one log line; 2 bad configuration or usage, one line per problem naming the variable.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, cast

from pydantic import ValidationError

from referral_service import logs
from referral_service.config import Settings, describe
from referral_service.startup import StartupError

if TYPE_CHECKING:
    from referral_service.domain.errors import DomainError

log = logging.getLogger("referral_service")

DESCRIPTION = """\
The referral service: gRPC and HTTP/JSON API, migrations, health check and accounts.
Flags override the matching REFERRAL_* environment variables (see README.md).
Exit codes: 0 done, 1 runtime failure (one log line), 2 bad configuration or usage."""


def _version() -> str:
    try:
        return version("referral-service")
    except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
        return "unknown"


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
    root = argparse.ArgumentParser(
        prog="referral-service", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    root.add_argument("--version", action="version", version=f"referral-service {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--database-url",
        dest="database_url",
        help="REFERRAL_DATABASE_URL: postgresql+asyncpg://... or sqlite+aiosqlite:///... "
        "(default: SQLite in the data directory)",
    )
    common.add_argument(
        "--redis-url", dest="redis_url", help="REFERRAL_REDIS_URL: redis://host:6379/0 (default: none)"
    )
    common.add_argument("--data-dir", dest="data_dir", help="REFERRAL_DATA_DIR (default: ./data)")
    common.add_argument(
        "--log-level",
        dest="log_level",
        help="REFERRAL_LOG_LEVEL: DEBUG, INFO, WARNING, ERROR or CRITICAL (default: INFO)",
    )
    common.add_argument(
        "--log-format",
        dest="log_format",
        choices=["text", "json"],
        help="REFERRAL_LOG_FORMAT (default: text)",
    )
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    commands.add_parser(
        "migrate",
        parents=[common],
        help="apply database migrations (waits for the database; PostgreSQL: one process at a time)",
    )
    health = commands.add_parser(
        "health",
        parents=[common],
        help="check the local server's health: exit 0 when SERVING, 1 otherwise (container health checks)",
    )
    health.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to wait for the answer (default: 3)"
    )

    superuser = commands.add_parser(
        "create-superuser",
        parents=[common],
        help="create a superuser (an existing account is refused unless --promote-existing)",
    )
    superuser.add_argument("--email", required=True, help="the superuser's email address")
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
    revoke.add_argument("name", help="the service account's name")
    return root


def _local(host: str) -> str:
    """Where to reach our own listener from this machine."""
    if host in ("0.0.0.0", ""):  # noqa: S104 - not binding: the address of the wildcard listener
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _health(settings: Settings, timeout: float) -> int:
    """The local server's overall health, from ``/healthz`` on the metrics port (when set) or
    the HTTP port, else from gRPC health: prints the status; 0 when SERVING."""
    import json
    import urllib.error
    import urllib.request

    context = None
    if settings.metrics.enabled and settings.metrics.port is not None:
        url = f"http://{_local(settings.metrics.host)}:{settings.metrics.port}/healthz"
    elif settings.http.enabled:
        scheme = "http"
        if settings.tls.enabled:
            import ssl

            # Our own port on this machine: whose certificate it serves is not the question here
            # (a port that requires client certificates needs REFERRAL_METRICS_PORT for this).
            scheme, context = "https", ssl._create_unverified_context()  # noqa: S323
        url = f"{scheme}://{_local(settings.http.host)}:{settings.http.port}/healthz"
    else:
        return _grpc_health(settings, timeout)
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:  # noqa: S310
            status = json.loads(response.read())["status"]
    except urllib.error.HTTPError as error:
        try:
            status = json.loads(error.read())["status"]
        except (ValueError, KeyError):
            status = f"HTTP {error.code}"
    except (OSError, ValueError, KeyError) as error:
        print(f"UNREACHABLE: {url}: {getattr(error, 'reason', error)}")
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


def _grpc_health(settings: Settings, timeout: float) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = f"{_local(settings.server.grpc_host)}:{settings.server.grpc_port}"
    with grpc.insecure_channel(target) as channel:
        try:
            stub: Any = health_pb2_grpc.HealthStub(channel)
            response = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as error:
            print(f"UNREACHABLE: {target}: {cast(Any, error).code().name}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(status)
    return 0 if status == "SERVING" else 1


def _serve(settings: Settings, migrate_first: bool) -> int:
    from referral_service.supervisor import claim_ports, run_event_loop, serve, serve_workers

    workers = settings.effective_workers
    if workers > 1:
        return serve_workers(settings, workers, migrate_first)
    claims = claim_ports(settings, shared=settings.server.so_reuseport)
    try:
        run_event_loop(settings, serve(settings, migrate_first))
    finally:
        for claim in claims:
            claim.close()
    return 0


def _configuration_problems(settings: Settings, args: argparse.Namespace) -> list[str]:
    """What the settings cannot express alone: the command's needs and the OTEL_* choices."""
    problems = []
    if args.command == "serve" and settings.effective_workers > 1 and settings.server.grpc_port == 0:
        problems.append(
            f"REFERRAL_GRPC_PORT: {settings.effective_workers} workers need a fixed port, not 0 "
            "(or set REFERRAL_WORKERS=1)"
        )
    if args.command == "serve" and settings.tls.enabled:
        from referral_service.app import check_tls_files

        try:
            check_tls_files(settings)  # the files exist (checked above); do they hold a key pair?
        except StartupError as error:
            problems.append(f"REFERRAL_TLS_CERT_FILE / REFERRAL_TLS_KEY_FILE: {error}")
    if args.command == "serve" and settings.tracing.enabled:
        from referral_service.tracing import TracingConfigError, check_environment

        try:
            check_environment()
        except TracingConfigError as error:
            problems.append(str(error))
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = _settings(args)
        problems = _configuration_problems(settings, args)
    except ValidationError as error:
        problems = describe(error)
    if problems:
        for problem in problems:
            print(f"referral-service: configuration error: {problem}", file=sys.stderr)
        return 2
    if args.command == "health":
        return _health(settings, args.timeout)
    logs.configure(settings.logging.level, settings.logging.format.value)
    from referral_service.supervisor import PortInUse

    try:
        if args.command == "serve":
            return _serve(settings, args.migrate)
        if args.command == "migrate":
            from referral_service.app import migrate_database

            asyncio.run(migrate_database(settings))
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
    except (StartupError, PortInUse) as error:
        log.error("%s", error)
        return 1
    except OSError as error:  # the data directory, a key file: what the system refused, in one line
        log.debug("start-up failed", exc_info=True)
        log.error("%s", error)
        return 1
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
