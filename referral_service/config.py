"""Settings: the only place that reads the environment (``REFERRAL_*`` and ``.env``).

Settings are grouped in code (``settings.database.url``, ``settings.redis.timeout_seconds``);
the environment variables keep their flat, public names (``REFERRAL_DATABASE_URL``), mapped to
the groups in one table (``FLAT_NAMES``, built from each group's prefix and aliases).

The defaults make ``make run`` work with no configuration: an SQLite file under ``./data/``,
the in-process cache, integrations off, and a JWT secret generated once into the data directory.
The ``production`` profile refuses to start with any of those insecure or local-only defaults.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from referral_service.cpus import available_cpus
from referral_service.files import private_directory, private_file


class Profile(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class HunterPolicy(StrEnum):
    """What registration does when Hunter cannot give a definite answer."""

    #: Accept the registration (deliverability ``unavailable`` / ``unknown``).
    FAIL_OPEN = "fail_open"
    #: Refuse it with UNAVAILABLE (EMAIL_VERIFICATION_UNAVAILABLE) and a RetryInfo.
    FAIL_CLOSED = "fail_closed"


class ClientAuth(StrEnum):
    """Whether a port asks TLS clients for a certificate (verified against
    ``REFERRAL_TLS_CLIENT_CA_FILE``)."""

    #: Not asked for: clients authenticate with tokens only.
    NONE = "none"
    #: Asked for and verified when given; clients without one still connect (HTTP port only:
    #: grpcio can only require a client certificate or not ask for one).
    OPTIONAL = "optional"
    #: Required: the handshake fails without a certificate the CA signed.
    REQUIRE = "require"


class EnrichmentProviderName(StrEnum):
    NONE = "none"
    CLEARBIT = "clearbit"
    PEOPLEDATALABS = "peopledatalabs"


MIN_SECRET_BYTES = 32


class JwtAlgorithm(StrEnum):
    HS256 = "HS256"
    EDDSA = "EdDSA"
    ES256 = "ES256"


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True, slots=True)
class Rate:
    """``limit`` events per ``period_seconds``; ``limit == 0`` means no limit."""

    limit: int
    period_seconds: float

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def __str__(self) -> str:
        return f"{self.limit}/{self.period_seconds:g}s" if self.enabled else "off"


def parse_rate(value: object) -> Rate:
    """``"10/15m"``, ``"300/1m"``, ``"20/1h"``, ``"5/30s"``; ``"off"`` or ``"0"`` disables."""
    if isinstance(value, Rate):
        return value
    if isinstance(value, Mapping):  # a dumped Rate (Settings.replace)
        return Rate(int(value["limit"]), float(value["period_seconds"]))
    text = str(value).strip().lower()
    if text in ("off", "0", "none", ""):
        return Rate(0, 1.0)
    count, slash, period = text.partition("/")
    try:
        if not slash:
            raise ValueError
        unit = period[-1]
        seconds = float(period) if unit.isdigit() else float(period[:-1] or 1) * _UNITS[unit]
        limit = int(count)
    except (ValueError, KeyError, IndexError):
        raise ValueError(f"a rate is written LIMIT/PERIOD, e.g. 10/15m or 300/1m, not {value!r}") from None
    if limit < 0 or seconds <= 0:
        raise ValueError(f"a rate needs a limit >= 0 and a positive period, not {value!r}")
    return Rate(limit, seconds)


#: Written ``LIMIT/PERIOD`` in the environment too (not JSON).
RateSetting = Annotated[Rate, BeforeValidator(parse_rate)]


def _empty_is_unset(value: object) -> object:
    return None if value == "" else value


def _http_url(value: str | None) -> str | None:
    if value is None:
        return None
    if not value.startswith(("https://", "http://")) or "?" in value or "#" in value:
        raise ValueError("must be an http(s) URL without query or fragment")
    return value.rstrip("/")


def _database_url(value: str | None) -> str | None:
    """An async SQLAlchemy URL of a backend the service supports. The message never repeats the
    URL (it may carry a password)."""
    if value is None:
        return None
    from sqlalchemy.engine import make_url  # imported by the service anyway
    from sqlalchemy.exc import ArgumentError

    expected = "postgresql+asyncpg://USER:PASSWORD@HOST:5432/DATABASE or sqlite+aiosqlite:///PATH"
    try:
        url = make_url(value)
    except (ArgumentError, ValueError):
        raise ValueError(f"not a database URL; expected {expected}") from None
    drivers = {"postgresql": "asyncpg", "sqlite": "aiosqlite"}
    backend, driver = url.get_backend_name(), url.get_driver_name()
    if backend not in drivers or "+" not in url.drivername or driver != drivers[backend]:
        raise ValueError(f"unsupported database or driver {url.drivername!r}; expected {expected}")
    if backend == "postgresql" and not (url.host or url.query.get("host")):
        raise ValueError(f"no host in the URL; expected {expected}")
    try:
        _ = url.port  # a port that is not a number fails here
    except ValueError:
        raise ValueError(f"the port is not a number; expected {expected}") from None
    return value


def _redis_url(value: str | None) -> str | None:
    if value is None:
        return None
    from urllib.parse import urlsplit

    expected = "redis://HOST:6379/0, rediss://HOST:6380/0 or unix:///PATH/redis.sock"
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError(f"not a Redis URL (bad port); expected {expected}") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"not a Redis URL (scheme {parts.scheme!r}); expected {expected}")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"no socket path; expected {expected}")
        return value
    if not parts.hostname:
        raise ValueError(f"no host in the URL; expected {expected}")
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ValueError(f"the database after the host must be a number; expected {expected}")
    del port
    return value


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(value: str) -> str:
    level = value.strip().upper()
    if level == "WARN":
        level = "WARNING"
    if level not in _LOG_LEVELS:
        raise ValueError(f"{value!r} is not a log level; use one of {', '.join(_LOG_LEVELS)}")
    return level


#: Unset when empty (``REFERRAL_REDIS_URL=`` means no Redis).
EmptyIsUnset = BeforeValidator(_empty_is_unset)
HttpUrl = AfterValidator(_http_url)


# --- the groups --------------------------------------------------------------------------------


class Group(BaseModel):
    """A group of settings. Each field is set by the environment variable ``REFERRAL_`` +
    ``env_prefix`` + the field name (upper-cased), or by its alias when it has one: the names
    are public and never change, whatever the grouping in code."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)
    env_prefix: ClassVar[str] = ""

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Flat setting name (the environment variable without ``REFERRAL_``, lower-case) ->
        field name."""
        return {(info.alias or cls.env_prefix + name): name for name, info in cls.model_fields.items()}

    @field_validator("*", mode="before")
    @classmethod
    def _seconds_are_durations(cls, value: object, info: ValidationInfo) -> object:
        """Durations: ISO 8601 (``PT15M``), ``HH:MM:SS``, or a plain number of seconds."""
        field = cls.model_fields[info.field_name] if info.field_name else None
        if (
            field is not None
            and field.annotation is timedelta
            and isinstance(value, str)
            and value.strip().replace(".", "", 1).isdigit()
        ):
            return float(value)
        return value


class ServerSettings(Group):
    grpc_host: str = "127.0.0.1"
    grpc_port: Annotated[int, Field(ge=0, le=65535)] = 50051
    #: Seconds in-flight calls get to finish after SIGTERM/SIGINT.
    shutdown_grace_seconds: Annotated[float, Field(ge=0)] = 10.0
    #: Seconds between reporting NOT_SERVING and refusing new calls, so that health watchers
    #: and load balancers move traffic away first.
    shutdown_drain_seconds: Annotated[float, Field(ge=0)] = 0.5
    #: Largest request message accepted, in bytes.
    max_message_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024
    #: SO_REUSEPORT on the listening socket (set for multi-worker serving; off in tests).
    so_reuseport: bool = False
    #: Server processes sharing the port (``serve --workers``); default: one per core.
    workers: Annotated[int, Field(ge=1, le=256)] | None = None
    #: ``auto`` uses uvloop when installed (``pip install 'referral-service[uvloop]'``).
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    #: How long a request_id is remembered (AIP-155).
    request_id_ttl: timedelta = timedelta(days=1)
    #: How often each process purges expired revocations, request ids and refresh tokens.
    housekeeping_interval: timedelta = timedelta(hours=1)
    #: How often each process checks, without any call, that the database and Redis answer
    #: (health turns NOT_SERVING within about this long of an outage, and back on recovery).
    health_probe_interval_seconds: Annotated[float, Field(gt=0, le=300)] = 2.0


class HttpSettings(Group):
    """HTTP/JSON transcoding of the gRPC API (from the protos' google.api.http annotations),
    /openapi.json, /docs (Swagger UI) and /healthz, served in the same process and loop."""

    env_prefix = "http_"
    #: Serve the HTTP gateway at all.
    enabled: bool = True
    host: str = "127.0.0.1"
    #: 0 picks a free port (``App.http_port`` tells which).
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    #: Largest JSON request body accepted, in bytes (413 beyond).
    max_body_bytes: Annotated[int, Field(ge=1024)] = 256 * 1024
    #: Deadline of the call an HTTP request turns into, seconds (504 beyond).
    timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    #: Origins allowed to call the API from a browser (CORS), comma-separated; ``*`` for any.
    #: Empty (default): no CORS headers, same-origin only.
    cors_origins: str = ""
    #: Serve /openapi.json and the /docs page.
    docs_enabled: bool = True

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]


class TlsSettings(Group):
    """TLS on the gRPC and HTTP ports, and client certificates (mTLS). The files are read at
    start-up and again on the first handshake after they change (a stat per handshake, no
    polling), so certificates rotate without a restart; a pair that does not load (a half-written
    rotation) is ignored until the files change again, and the previous one keeps serving."""

    env_prefix = "tls_"
    #: PEM certificate chain (leaf first) both ports serve; set with ``tls_key_file`` to turn TLS
    #: on. Unset: plaintext (h2c and HTTP/1.1).
    cert_file: Annotated[FilePath | None, EmptyIsUnset] = None
    #: PEM private key of that certificate (unencrypted; keep the file 0600).
    key_file: Annotated[FilePath | None, EmptyIsUnset] = None
    #: PEM bundle of the CA(s) client certificates must chain to.
    client_ca_file: Annotated[FilePath | None, EmptyIsUnset] = None
    #: Client certificates on the gRPC port (and on the HTTP port unless
    #: ``http_tls_client_auth`` says otherwise): ``none`` or ``require``.
    client_auth: ClientAuth = ClientAuth.NONE
    #: Client certificates on the HTTP port: ``none``, ``optional`` or ``require``. Unset: as
    #: ``tls_client_auth``.
    http_client_auth: Annotated[ClientAuth | None, EmptyIsUnset] = Field(None, alias="http_tls_client_auth")
    #: Client certificates that authenticate as a service account, without a token: the
    #: certificate's identity (its SPIFFE ID, else its subject CN) -> the account's name, e.g.
    #: ``{"spiffe://example.org/ns/billing/sa/api": "billing"}`` (JSON).
    service_accounts: dict[str, str] = Field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @property
    def effective_http_client_auth(self) -> ClientAuth:
        return self.http_client_auth if self.http_client_auth is not None else self.client_auth

    @model_validator(mode="after")
    def _check(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("REFERRAL_TLS_CERT_FILE and REFERRAL_TLS_KEY_FILE go together: set both or none")
        if self.client_auth is ClientAuth.OPTIONAL:
            raise ValueError(
                "REFERRAL_TLS_CLIENT_AUTH=optional is not possible on the gRPC port (grpcio either "
                "requires a client certificate or does not ask for one): use none or require, and "
                "REFERRAL_HTTP_TLS_CLIENT_AUTH=optional for the HTTP port"
            )
        for name, mode in (
            ("REFERRAL_TLS_CLIENT_AUTH", self.client_auth),
            ("REFERRAL_HTTP_TLS_CLIENT_AUTH", self.effective_http_client_auth),
        ):
            if mode is ClientAuth.NONE:
                continue
            if not self.enabled:
                raise ValueError(f"{name}={mode.value} needs TLS: set REFERRAL_TLS_CERT_FILE and _KEY_FILE")
            if self.client_ca_file is None:
                raise ValueError(f"{name}={mode.value} needs REFERRAL_TLS_CLIENT_CA_FILE")
        if (
            self.service_accounts
            and self.client_auth is ClientAuth.NONE
            and self.effective_http_client_auth is ClientAuth.NONE
        ):
            raise ValueError(
                "REFERRAL_TLS_SERVICE_ACCOUNTS needs client certificates: set REFERRAL_TLS_CLIENT_AUTH "
                "(or REFERRAL_HTTP_TLS_CLIENT_AUTH) and REFERRAL_TLS_CLIENT_CA_FILE"
            )
        return self


class DatabaseSettings(Group):
    env_prefix = "database_"
    #: SQLAlchemy async URL. Default: SQLite file ``<data_dir>/referral.db``.
    url: Annotated[str | None, EmptyIsUnset, AfterValidator(_database_url)] = None
    pool_size: Annotated[int, Field(ge=1)] = 10
    #: Seconds to wait for a database connection or statement before failing the call.
    timeout_seconds: Annotated[float, Field(gt=0)] = 5.0
    #: At start-up (``serve``, ``migrate``), how long to wait for the database to answer before
    #: giving up with one line and exit code 1.
    startup_timeout_seconds: Annotated[float, Field(ge=0)] = 15.0


class RedisSettings(Group):
    env_prefix = "redis_"
    #: Redis URL (``redis://host:6379/0``). Unset: the in-process cache and stores.
    url: Annotated[str | None, EmptyIsUnset, AfterValidator(_redis_url)] = None
    #: Prefix of every Redis key this service writes.
    key_prefix: str = "referral:"
    #: Socket connect/read timeout for Redis, seconds. Keep it small: Redis is an accelerator.
    timeout_seconds: Annotated[float, Field(gt=0)] = 0.25
    #: Consecutive Redis failures that open the circuit breaker.
    breaker_threshold: Annotated[int, Field(ge=1)] = 3
    #: Seconds the breaker stays open before one trial call.
    breaker_reset_seconds: Annotated[float, Field(gt=0)] = 5.0


class JwtSettings(Group):
    env_prefix = "jwt_"
    #: HMAC secret for JWTs (at least 32 bytes). Required in production; in development a
    #: random secret is generated once into ``<data_dir>/jwt-secret``.
    secret: SecretStr | None = None
    issuer: str = "referral-service"
    audience: str = "referral-service"
    access_token_ttl: timedelta = Field(timedelta(minutes=15), alias="access_token_ttl")
    refresh_token_ttl: timedelta = Field(timedelta(days=30), alias="refresh_token_ttl")
    #: Key of the keyed hash (HMAC-SHA256) service-account secrets are stored as, at least 32
    #: bytes. Required in production; in development one is generated once into
    #: ``<data_dir>/client-secret-key``. Changing it invalidates every client secret.
    client_secret_key: SecretStr | None = Field(None, alias="client_secret_key")
    #: Live login sessions per user; a login beyond it revokes the user's oldest session.
    max_sessions_per_user: int = Field(20, ge=1, le=10_000, alias="max_sessions_per_user")
    #: Clock skew tolerated when checking exp/nbf/iat, seconds.
    leeway_seconds: Annotated[int, Field(ge=0, le=300)] = 30
    #: Algorithm of newly issued tokens. ``HS256`` signs with ``jwt_secret``; ``EdDSA``
    #: (Ed25519) and ``ES256`` (P-256) sign with ``jwt_private_key`` and publish the public keys
    #: through ``AuthService.GetJwks`` so other services verify tokens without calling us.
    algorithm: JwtAlgorithm = JwtAlgorithm.HS256
    #: PEM private key (Ed25519 for EdDSA, P-256 for ES256). Required in production with an
    #: asymmetric algorithm; in development one is generated once into ``<data_dir>``.
    private_key: SecretStr | None = None
    #: ... or the file holding it (read at start-up).
    private_key_file: Annotated[FilePath | None, EmptyIsUnset] = None
    #: Earlier HMAC secrets whose tokens are still accepted (never used to sign): rotate
    #: ``jwt_secret`` by moving the old value here for one refresh-token lifetime. JSON list.
    previous_secrets: list[SecretStr] = Field(default_factory=list)
    #: Earlier public (or private) keys, PEM, whose tokens are still accepted and which stay in
    #: the JWKS: rotate ``jwt_private_key`` by moving the old key here. JSON list.
    previous_public_keys: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_secrets(self) -> JwtSettings:
        if self.secret is not None and len(self.secret.get_secret_value().encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"REFERRAL_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes")
        key = self.client_secret_key
        if key is not None and len(key.get_secret_value().encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"REFERRAL_CLIENT_SECRET_KEY must be at least {MIN_SECRET_BYTES} bytes")
        for old in self.previous_secrets:
            if len(old.get_secret_value().encode()) < MIN_SECRET_BYTES:
                raise ValueError(
                    f"REFERRAL_JWT_PREVIOUS_SECRETS must be at least {MIN_SECRET_BYTES} bytes each"
                )
        return self


class PasswordSettings(Group):
    """argon2id; the defaults are OWASP's minimum: m=19 MiB, t=2, p=1."""

    argon2_time_cost: Annotated[int, Field(ge=2)] = 2
    argon2_memory_kib: Annotated[int, Field(ge=19 * 1024)] = 19 * 1024
    argon2_parallelism: Annotated[int, Field(ge=1)] = 1
    #: Threads that hash passwords; default: one per core.
    hash_workers: Annotated[int, Field(ge=1)] = Field(default_factory=available_cpus)
    #: Hash jobs allowed to wait for a thread; beyond that callers wait without queueing work.
    hash_queue: Annotated[int, Field(ge=1)] = 256


class CodeSettings(Group):
    env_prefix = "code_"
    #: Furthest a code's expiry may lie in the future (at most 100 years: expiries stay far
    #: from the end of the calendar).
    max_horizon: Annotated[timedelta, Field(gt=timedelta(0), le=timedelta(days=36525))] = timedelta(days=365)
    #: Lifetime of cached ``GetReferralCodeByEmail`` answers (never past the code's expiry).
    cache_ttl: timedelta = timedelta(minutes=5)
    #: Lifetime of cached "no live code" answers.
    negative_cache_ttl: timedelta = timedelta(seconds=30)
    list_default_page_size: Annotated[int, Field(ge=1)] = Field(50, alias="list_default_page_size")
    list_max_page_size: Annotated[int, Field(ge=1)] = Field(1000, alias="list_max_page_size")

    @model_validator(mode="after")
    def _check_pages(self) -> CodeSettings:
        if self.list_default_page_size > self.list_max_page_size:
            raise ValueError("list_default_page_size exceeds list_max_page_size")
        return self


class HunterSettings(Group):
    """Email verification with Hunter's Email Verifier: on when REFERRAL_HUNTER_API_KEY is set."""

    env_prefix = "hunter_"
    api_key: Annotated[SecretStr | None, EmptyIsUnset] = None
    base_url: Annotated[str, HttpUrl] = "https://api.hunter.io/v2"
    policy: HunterPolicy = HunterPolicy.FAIL_OPEN
    #: TCP/TLS connect timeout per request, seconds.
    connect_timeout_seconds: Annotated[float, Field(gt=0)] = 1.0
    #: Timeout waiting for response bytes per request, seconds.
    read_timeout_seconds: Annotated[float, Field(gt=0)] = 3.0
    #: Upper bound on the whole verification, retries included: registration never waits
    #: longer than this for Hunter.
    total_timeout_seconds: Annotated[float, Field(gt=0)] = 5.0
    #: Requests per verification when Hunter answers 202/222 ("try again").
    max_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    #: First backoff between those attempts, doubled each time.
    retry_backoff_seconds: Annotated[float, Field(ge=0)] = 0.5
    #: How long definite answers (valid, accept_all, webmail, invalid, disposable) are cached.
    cache_ttl: timedelta = timedelta(days=1)
    #: Consecutive failures (timeouts, 401/403/429/5xx, bad JSON) that open the breaker.
    breaker_threshold: Annotated[int, Field(ge=1)] = 5
    #: Seconds the breaker stays open (registrations skip Hunter meanwhile).
    breaker_reset_seconds: Annotated[float, Field(gt=0)] = 30.0

    @property
    def enabled(self) -> bool:
        return self.api_key is not None


class EnrichmentSettings(Group):
    """Profile enrichment after registration, in the background."""

    env_prefix = "enrichment_"
    provider: EnrichmentProviderName = EnrichmentProviderName.NONE
    api_key: Annotated[SecretStr | None, EmptyIsUnset] = None
    #: Default: the provider's public API (https://person.clearbit.com,
    #: https://api.peopledatalabs.com).
    base_url: Annotated[str | None, EmptyIsUnset, HttpUrl] = None
    connect_timeout_seconds: Annotated[float, Field(gt=0)] = 2.0
    read_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    #: Lookups per user before giving up (state FAILED).
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 5
    #: First retry delay, doubled after each failed attempt up to ``enrichment_retry_max``.
    retry_backoff: timedelta = timedelta(seconds=30)
    retry_max: timedelta = timedelta(hours=1)
    #: Lookups running at once per process.
    concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    #: How often the worker scans the database for due lookups (new registrations wake it at
    #: once; the scan picks up retries, restarts and other processes' leftovers).
    poll_seconds: Annotated[float, Field(gt=0)] = 15.0
    #: A claimed lookup is invisible to other workers for this long; if the process dies, it
    #: becomes due again afterwards.
    lease: timedelta = timedelta(minutes=2)
    breaker_threshold: Annotated[int, Field(ge=1)] = 5
    breaker_reset_seconds: Annotated[float, Field(gt=0)] = 60.0

    @property
    def enabled(self) -> bool:
        return self.provider is not EnrichmentProviderName.NONE

    @model_validator(mode="after")
    def _check(self) -> EnrichmentSettings:
        if self.enabled and self.api_key is None:
            raise ValueError(
                f"REFERRAL_ENRICHMENT_PROVIDER={self.provider.value} needs REFERRAL_ENRICHMENT_API_KEY"
            )
        if self.lease.total_seconds() <= self.connect_timeout_seconds + self.read_timeout_seconds:
            raise ValueError("REFERRAL_ENRICHMENT_LEASE must exceed the connect + read timeouts")
        return self


def _smtp_url(value: SecretStr | None) -> SecretStr | None:
    """``smtp://`` or ``smtps://``; the message never repeats the URL (it may carry a password)."""
    if value is None:
        return None
    from referral_service.integrations.mail import parse_smtp_url

    try:
        parse_smtp_url(value.get_secret_value())
    except ValueError as error:
        raise ValueError(
            f"{error}; expected smtp://USER:PASSWORD@HOST:587 (STARTTLS) or smtps://USER:PASSWORD@HOST:465"
        ) from None
    return value


def _link_template(value: str | None) -> str | None:
    if value is None:
        return None
    if "{token}" not in value or not value.startswith(("https://", "http://")):
        raise ValueError("must be an http(s) URL containing {token}")
    return value


class MailSettings(Group):
    """Email: the SMTP server, the sender, and the links in the messages. Without
    ``REFERRAL_SMTP_URL`` messages are written to a local mail directory (``REFERRAL_MAIL_DIR``,
    by default ``mail/`` in the data directory)."""

    env_prefix = "mail_"
    #: ``smtp://USER:PASSWORD@HOST:587`` (STARTTLS when offered; ``?starttls=required`` or
    #: ``?starttls=off``) or ``smtps://USER:PASSWORD@HOST:465``; percent-encode special
    #: characters in the user and password.
    smtp_url: Annotated[SecretStr | None, EmptyIsUnset, AfterValidator(_smtp_url)] = Field(
        None, alias="smtp_url"
    )
    #: CA bundle for the SMTP server's certificate (default: the system's).
    smtp_ca_file: Annotated[FilePath | None, EmptyIsUnset] = Field(None, alias="smtp_ca_file")
    smtp_timeout_seconds: Annotated[float, Field(gt=0)] = Field(15.0, alias="smtp_timeout_seconds")
    #: The From header.
    sender: str = Field("Referral Service <no-reply@localhost>", alias="mail_from")
    #: The product name in the messages.
    product_name: str = "Referral Service"
    #: Where messages go without SMTP (default: ``mail/`` in the data directory).
    dir: Annotated[Path | None, EmptyIsUnset] = None
    #: The address users reach this service's HTTP port at: the messages' links open its pages
    #: ``/verify-email`` and ``/reset-password``.
    public_url: Annotated[str, HttpUrl] = Field("http://127.0.0.1:8080", alias="public_url")
    #: Links pointing at your own app instead: a URL with ``{token}``, e.g.
    #: ``https://app.example.com/verify#token={token}``.
    verify_link: Annotated[str | None, EmptyIsUnset, AfterValidator(_link_template)] = Field(
        None, alias="email_verify_link"
    )
    reset_link: Annotated[str | None, EmptyIsUnset, AfterValidator(_link_template)] = Field(
        None, alias="password_reset_link"
    )
    #: How long a verification link and code work.
    verification_ttl: timedelta = Field(timedelta(hours=24), alias="email_verification_ttl")
    #: How long a password reset link works.
    reset_ttl: timedelta = Field(timedelta(minutes=30), alias="password_reset_ttl")
    #: First retry delay of a message that could not be sent, doubled after each failure up to
    #: ``mail_retry_max``; given up (state ``failed``) after ``mail_max_attempts``.
    retry_backoff: timedelta = timedelta(seconds=30)
    retry_max: timedelta = timedelta(hours=1)
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 30
    #: Messages sent at once per process.
    concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    #: How often the worker looks for due messages (new ones wake it at once).
    poll_seconds: Annotated[float, Field(gt=0)] = 5.0
    #: A claimed message is invisible to other workers this long (more than the SMTP timeout).
    lease: timedelta = timedelta(minutes=2)

    @model_validator(mode="after")
    def _check(self) -> MailSettings:
        if self.lease.total_seconds() <= self.smtp_timeout_seconds * 2:
            raise ValueError("REFERRAL_MAIL_LEASE must exceed twice REFERRAL_SMTP_TIMEOUT_SECONDS")
        for name, ttl in (
            ("REFERRAL_EMAIL_VERIFICATION_TTL", self.verification_ttl),
            ("REFERRAL_PASSWORD_RESET_TTL", self.reset_ttl),
        ):
            if not timedelta(minutes=1) <= ttl <= timedelta(days=30):
                raise ValueError(f"{name} must be between 1 minute and 30 days")
        return self

    @property
    def verify_link_template(self) -> str:
        return self.verify_link or f"{self.public_url}/verify-email#token={{token}}"

    @property
    def reset_link_template(self) -> str:
        return self.reset_link or f"{self.public_url}/reset-password#token={{token}}"


class EventSettings(Group):
    """Events for other services (``docs/events.md``): the outbox, WatchEvents, webhooks."""

    env_prefix = "events_"
    #: How long events are kept; housekeeping purges older ones (a consumer resuming from an
    #: older cursor gets OUT_OF_RANGE).
    retention: timedelta = timedelta(days=7)
    #: How often a worker with watchers looks for events committed elsewhere (PostgreSQL
    #: also notifies at once; this is the fallback, and SQLite's only way).
    poll_seconds: Annotated[float, Field(gt=0, le=10)] = 0.25
    #: A watcher with nothing to receive gets a progress message this often.
    progress_seconds: Annotated[float, Field(gt=0)] = 5.0

    @model_validator(mode="after")
    def _check(self) -> EventSettings:
        if self.retention < timedelta(hours=1):
            raise ValueError("REFERRAL_EVENTS_RETENTION must be at least an hour")
        return self


class WebhookSettings(Group):
    """Webhook deliveries (``docs/events.md``)."""

    env_prefix = "webhooks_"
    #: Allow http and private, loopback or link-local targets (tests, closed networks). Off:
    #: https to public addresses only (SSRF).
    allow_private: bool = False
    #: Attempts per delivery before it is failed (the default spans about a day).
    max_attempts: Annotated[int, Field(ge=1, le=50)] = 14
    #: First retry delay, doubled after each failed attempt up to ``webhooks_retry_max``.
    retry_backoff: timedelta = timedelta(seconds=30)
    retry_max: timedelta = timedelta(hours=4)
    #: Failed attempts in a row after which an endpoint is disabled.
    disable_after_failures: Annotated[int, Field(ge=1)] = 30
    #: Longest wait of an idle worker before it looks again (new events wake it at once, and it
    #: wakes for the next retry it knows of): what is left to it are deliveries whose sender
    #: died (after their lease).
    poll_seconds: Annotated[float, Field(gt=0)] = 30.0
    #: Deliveries sent at once per worker.
    concurrency: Annotated[int, Field(ge=1, le=256)] = 8
    timeout_seconds: Annotated[float, Field(gt=0, le=60)] = 10.0


class RateLimitSettings(Group):
    """Each limit is ``LIMIT/PERIOD`` (``10/15m``; ``off`` disables one), enforced with GCRA in
    Redis (atomic, shared by every worker and replica) or, without Redis or while it is down,
    in each process. Which RPC each limit applies to is declared in the protos."""

    env_prefix = "rate_limit_"
    #: Master switch.
    enabled: bool = Field(True, alias="rate_limits_enabled")
    #: Failed logins per account (email) and client address.
    login_account_address: RateSetting = Rate(10, 900)
    #: Failed logins per account from every address together (a much higher ceiling). Client
    #: addresses that logged in to the account before are exempt: throttled, never locked out.
    login_account: RateSetting = Rate(100, 900)
    #: Failed logins per client address.
    login_address: RateSetting = Rate(100, 900)
    #: Successful logins per account (each opens a session).
    login_success_account: RateSetting = Rate(30, 3600)
    #: Logins (attempts, whatever their outcome) per client address.
    login_calls_address: RateSetting = Rate(300, 900)
    #: Refreshes (attempts) per client address.
    refresh_address: RateSetting = Rate(600, 900)
    #: Wrong current passwords in ``ChangePassword`` per user.
    password_change_user: RateSetting = Rate(5, 900)
    #: Registrations per service account registering users on their behalf (``users:register``).
    register_service: RateSetting = Rate(1000, 60)
    #: Failed ``IssueServiceToken`` calls (wrong client id or secret) per client address.
    service_token_address: RateSetting = Rate(20, 900)
    #: Per service account (by name), a rate replacing the defaults of every per-service limit,
    #: e.g. ``{"billing": "5000/1m"}`` (JSON).
    service_rates: dict[str, RateSetting] = Field(default_factory=dict)
    #: Registrations (attempts) per client address.
    register_address: RateSetting = Rate(20, 3600)
    #: ``GetReferralCodeByEmail`` calls per client address.
    lookup_address: RateSetting = Rate(300, 60)
    #: Registrations naming a referral code that does not exist, per client address (guessing).
    code_check_address: RateSetting = Rate(30, 3600)
    #: Failed ``VerifyEmail`` calls (unknown tokens, wrong codes) per client address.
    verify_email_address: RateSetting = Rate(30, 3600)
    #: ``ResendVerificationEmail`` requests per email, whether or not it has an account.
    verification_resend_account: RateSetting = Rate(5, 3600)
    #: ``ResendVerificationEmail`` requests per client address.
    verification_resend_address: RateSetting = Rate(20, 3600)
    #: ``RequestPasswordReset`` requests per email, whether or not it has an account.
    password_reset_account: RateSetting = Rate(5, 3600)
    #: ``RequestPasswordReset`` requests per client address.
    password_reset_address: RateSetting = Rate(20, 3600)
    #: Failed ``ResetPassword`` calls (unknown tokens) per client address.
    password_reset_confirm_address: RateSetting = Rate(30, 3600)
    #: ``CreateReferralCode`` calls per user.
    code_create_user: RateSetting = Rate(10, 3600)
    #: ``DeleteReferralCode`` calls per user.
    code_delete_user: RateSetting = Rate(10, 3600)
    #: Vanity codes issued (successful ``CreateReferralCode`` calls naming a code) per user:
    #: issued vanity codes stay their owner's forever, so a squatter should not reserve many.
    vanity_code_user: RateSetting = Rate(5, 86400)
    #: Peers (CIDRs) whose ``rate_limit_client_address_header`` is believed, e.g. your load
    #: balancers. Anyone else's header is ignored and the TCP peer is the client. JSON list.
    trusted_proxies: list[str] = Field(default_factory=list)
    #: Metadata carrying the client address when the peer is a trusted proxy (the right-most
    #: entry that is not itself a trusted proxy is used).
    client_address_header: str = "x-forwarded-for"
    #: IPv6 clients are limited per network of this prefix length (one host often owns a /64).
    ipv6_prefix: Annotated[int, Field(ge=32, le=128)] = 64
    #: How long a client address that logged in to an account stays exempt from that
    #: account's ``login_account`` ceiling.
    trust_ttl: timedelta = timedelta(days=30)

    @field_validator("trusted_proxies")
    @classmethod
    def _check_cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)
        return value

    @classmethod
    def every_rate(cls, value: str) -> dict[str, str]:
        """``value`` for every limit, by flat setting name (``rate_limit_login_account``): for load
        generators and test suites, whose one client address would be throttled like an attacker."""
        return {
            f"rate_limit_{name}": value
            for name, field in cls.model_fields.items()
            if isinstance(field.default, Rate)
        }

    def rates(self) -> dict[str, Rate]:
        """Every limit by the name the protos use (``login-account``), off ones included; none
        when rate limits are off."""
        if not self.enabled:
            return {}
        return {
            name.replace("_", "-"): value
            for name in type(self).model_fields
            if isinstance(value := getattr(self, name), Rate)
        }


class RegistrationSettings(Group):
    #: Refuse addresses at known disposable-email domains (list from ``disposable-email-domains``).
    reject_disposable_emails: bool = True
    #: Extra domains to refuse, and domains to allow although the list names them. JSON lists.
    disposable_domains_extra: list[str] = Field(default_factory=list)
    disposable_domains_allowed: list[str] = Field(default_factory=list)


class RewardSettings(Group):
    """The referral programme (issue 17; docs/rewards.md)."""

    env_prefix = "rewards_"
    #: The programme's rules (TOML), read and validated at start-up. Unset: no programme
    #: (conversions are recorded; nothing qualifies and no rewards are granted).
    rules_file: Annotated[FilePath | None, EmptyIsUnset] = None


class LogSettings(Group):
    env_prefix = "log_"
    #: DEBUG, INFO, WARNING, ERROR or CRITICAL (any case). Health probes and /metrics scrapes
    #: are logged at DEBUG.
    level: Annotated[str, AfterValidator(_log_level)] = "INFO"
    format: LogFormat = LogFormat.TEXT


class MetricsSettings(Group):
    """Prometheus metrics at ``/metrics``, added up over every worker process."""

    env_prefix = "metrics_"
    #: Serve ``/metrics``.
    enabled: bool = True
    #: Unset: ``/metrics`` on the HTTP port. Set: on this port only (with ``/healthz``,
    #: ``/readyz`` and ``/livez``), plain HTTP, so that the API port need not expose them.
    port: Annotated[int | None, EmptyIsUnset, Field(ge=0, le=65535)] = None
    #: Address of the metrics port.
    host: str = "127.0.0.1"


class TracingSettings(Group):
    """OpenTelemetry traces: off by default (nothing of OpenTelemetry is even imported). When on,
    the exporter, sampler and resource come from the standard ``OTEL_*`` variables
    (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_TRACES_SAMPLER``, ``OTEL_SERVICE_NAME``, ...)."""

    env_prefix = "tracing_"
    enabled: bool = False

    @model_validator(mode="after")
    def _check(self) -> TracingSettings:
        if self.enabled:
            import importlib.util

            if importlib.util.find_spec("opentelemetry.sdk") is None:
                raise ValueError(
                    "REFERRAL_TRACING_ENABLED=true needs the OpenTelemetry packages: "
                    "pip install 'referral-service[tracing]'"
                )
        return self


#: The groups, by the name of their field on ``Settings``.
GROUPS: dict[str, type[Group]] = {
    "server": ServerSettings,
    "http": HttpSettings,
    "tls": TlsSettings,
    "database": DatabaseSettings,
    "redis": RedisSettings,
    "jwt": JwtSettings,
    "passwords": PasswordSettings,
    "codes": CodeSettings,
    "hunter": HunterSettings,
    "enrichment": EnrichmentSettings,
    "events": EventSettings,
    "webhooks": WebhookSettings,
    "rate_limits": RateLimitSettings,
    "registration": RegistrationSettings,
    "rewards": RewardSettings,
    "logging": LogSettings,
    "metrics": MetricsSettings,
    "tracing": TracingSettings,
    "mail": MailSettings,
}
#: Flat setting name (``database_url``) -> (group, field): the public names, defined once.
FLAT_NAMES: dict[str, tuple[str, str]] = {
    flat: (group, field) for group, model in GROUPS.items() for flat, field in model.env_names().items()
}
_TOP_LEVEL = ("profile", "data_dir")


def _group_flat_names(data: dict[str, Any]) -> dict[str, Any]:
    """Move flat names (``database_url=...``) into their groups (``database={"url": ...}``);
    a flat name wins over the same field given in its group."""
    grouped = dict(data)
    for flat, (group, field) in FLAT_NAMES.items():
        if flat in grouped:
            value = grouped.pop(flat)
            current = grouped.get(group)
            members = current.model_dump(exclude_unset=True) if isinstance(current, Group) else current
            grouped[group] = {**(members or {}), field: value}
    return grouped


class _FlatEnvironment(PydanticBaseSettingsSource):
    """Reads ``REFERRAL_<FLAT NAME>`` from a mapping of environment variables (the process
    environment, or ``.env``) into the groups."""

    def __init__(self, settings_cls: type[BaseSettings], variables: Mapping[str, str | None]) -> None:
        super().__init__(settings_cls)
        self._variables = variables

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads every name at once

    def __call__(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for flat in (*_TOP_LEVEL, *FLAT_NAMES):
            raw = self._variables.get(f"referral_{flat}")
            if raw is None:
                continue
            if flat in FLAT_NAMES:
                group, field = FLAT_NAMES[flat]
                annotation = GROUPS[group].model_fields[field].annotation
                if get_origin(annotation) is list and raw.strip():
                    raw = json.loads(raw)  # lists are JSON, as pydantic-settings reads them
            found[flat] = raw
        return _group_flat_names(found)


class Settings(BaseSettings):
    """Every knob of the service, grouped (``settings.database.url``). Each is set by its
    environment variable, named after its flat name: ``REFERRAL_DATABASE_URL`` sets
    ``database.url``; ``Settings(database_url=...)`` takes the same flat names."""

    model_config = SettingsConfigDict(
        env_prefix="REFERRAL_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    profile: Profile = Profile.DEVELOPMENT
    data_dir: Path = Path("data")
    server: ServerSettings = ServerSettings()
    http: HttpSettings = HttpSettings()
    tls: TlsSettings = TlsSettings()
    database: DatabaseSettings = DatabaseSettings()
    redis: RedisSettings = RedisSettings()
    jwt: JwtSettings = JwtSettings()
    passwords: PasswordSettings = Field(default_factory=PasswordSettings)
    codes: CodeSettings = CodeSettings()
    hunter: HunterSettings = HunterSettings()
    enrichment: EnrichmentSettings = EnrichmentSettings()
    mail: MailSettings = MailSettings()
    events: EventSettings = EventSettings()
    webhooks: WebhookSettings = WebhookSettings()
    rate_limits: RateLimitSettings = RateLimitSettings()
    registration: RegistrationSettings = RegistrationSettings()
    rewards: RewardSettings = RewardSettings()
    logging: LogSettings = LogSettings()
    metrics: MetricsSettings = MetricsSettings()
    tracing: TracingSettings = TracingSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        environment: Mapping[str, str | None] = getattr(env_settings, "env_vars", {})
        dotenv: Mapping[str, str | None] = getattr(dotenv_settings, "env_vars", {})
        return (
            init_settings,
            _FlatEnvironment(settings_cls, environment),
            _FlatEnvironment(settings_cls, dotenv),
        )

    @model_validator(mode="before")
    @classmethod
    def _flat_names(cls, data: Any) -> Any:
        return _group_flat_names(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _check_profile(self) -> Settings:
        if self.profile is not Profile.PRODUCTION:
            return self
        problems = []
        if self.jwt.secret is None:
            problems.append("REFERRAL_JWT_SECRET is not set")
        if self.jwt.client_secret_key is None:
            problems.append("REFERRAL_CLIENT_SECRET_KEY is not set")
        if self.database.url is None or self.database.url.startswith("sqlite"):
            problems.append("REFERRAL_DATABASE_URL must point at PostgreSQL")
        if self.redis.url is None:
            problems.append("REFERRAL_REDIS_URL is not set")
        # API keys travel in headers: never over plain HTTP in production.
        if self.hunter.enabled and not self.hunter.base_url.startswith("https://"):
            problems.append("REFERRAL_HUNTER_BASE_URL must be https")
        if self.enrichment.base_url is not None and not self.enrichment.base_url.startswith("https://"):
            problems.append("REFERRAL_ENRICHMENT_BASE_URL must be https")
        if self.mail.smtp_url is None:
            problems.append("REFERRAL_SMTP_URL is not set (messages would stay in a local directory)")
        if not self.mail.public_url.startswith("https://"):
            problems.append("REFERRAL_PUBLIC_URL must be https (its links carry tokens)")
        if (
            self.jwt.algorithm is not JwtAlgorithm.HS256
            and self.jwt.private_key is None
            and self.jwt.private_key_file is None
        ):
            problems.append("REFERRAL_JWT_PRIVATE_KEY (or _FILE) is not set")
        if problems:
            raise ValueError("production profile refuses insecure defaults: " + "; ".join(problems))
        return self

    @model_validator(mode="after")
    def _check_ports(self) -> Settings:
        """Two listeners of ours on one port would fail (or, with SO_REUSEPORT, share it)."""
        wildcard = ("0.0.0.0", "::", "")  # noqa: S104 - comparing, not binding
        listeners = [("REFERRAL_GRPC_PORT", self.server.grpc_host, self.server.grpc_port)]
        if self.http.enabled:
            listeners.append(("REFERRAL_HTTP_PORT", self.http.host, self.http.port))
        if self.metrics.enabled and self.metrics.port is not None:
            listeners.append(("REFERRAL_METRICS_PORT", self.metrics.host, self.metrics.port))
        for index, (name, host, port) in enumerate(listeners):
            for other, other_host, other_port in listeners[:index]:
                same_host = host == other_host or host in wildcard or other_host in wildcard
                if port and port == other_port and same_host:
                    raise ValueError(f"{name}: {port} is also {other}; each listener needs its own port")
        return self

    def replace(self, **flat: Any) -> Settings:
        """A copy with some settings changed, by flat name (``replace(grpc_port=0)``)."""
        return type(self).model_validate({**self.model_dump(exclude_defaults=True), **flat})

    def plaintext_exposed(self) -> list[str]:
        """The ports that serve plaintext on an address other than loopback (``gRPC
        0.0.0.0:50051``): warned about at start-up, not refused, since a mesh sidecar or a load
        balancer often terminates TLS in front of the service."""
        if self.tls.enabled:
            return []
        listeners = [("gRPC", self.server.grpc_host, self.server.grpc_port)]
        if self.http.enabled:
            listeners.append(("HTTP", self.http.host, self.http.port))
        return [f"{name} {host}:{port}" for name, host, port in listeners if not _is_loopback(host)]

    @property
    def effective_workers(self) -> int:
        """``REFERRAL_WORKERS``, else one per CPU this process may use (the cgroup CPU quota
        counts: a container limited to 2 CPUs gets 2 workers, whatever the host has)."""
        return self.server.workers if self.server.workers is not None else available_cpus()

    @property
    def shared_cache_needed(self) -> bool:
        """Several processes with no Redis: a per-process look-up cache would go stale."""
        return self.effective_workers > 1 and self.redis.url is None

    @property
    def effective_database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite+aiosqlite:///{self.data_dir / 'referral.db'}"

    def resolve_mail_dir(self) -> Path:
        """Where messages go without SMTP: ``REFERRAL_MAIL_DIR``, or ``mail/`` in the data
        directory (created 0700 like it)."""
        if self.mail.dir is not None:
            return self.mail.dir
        private_directory(self.data_dir)
        return self.data_dir / "mail"

    def resolve_jwt_secret(self) -> bytes:
        """The configured secret, or (development only) one generated once into the data
        directory with mode 0600, so restarts and worker processes share it."""
        if self.jwt.secret is not None:
            return self.jwt.secret.get_secret_value().encode()
        path = self.data_dir / "jwt-secret"
        _create_once(path, lambda: (secrets.token_urlsafe(48) + "\n").encode())
        secret = path.read_text().strip()
        if len(secret) < MIN_SECRET_BYTES:
            raise RuntimeError(f"{path} holds a secret shorter than {MIN_SECRET_BYTES} bytes")
        return secret.encode()

    def resolve_client_secret_key(self) -> bytes:
        """The configured key of the client-secret hash, or (development only) one generated
        once into the data directory with mode 0600."""
        if self.jwt.client_secret_key is not None:
            return self.jwt.client_secret_key.get_secret_value().encode()
        path = self.data_dir / "client-secret-key"
        _create_once(path, lambda: (secrets.token_urlsafe(48) + "\n").encode())
        key = path.read_text().strip()
        if len(key) < MIN_SECRET_BYTES:
            raise RuntimeError(f"{path} holds a key shorter than {MIN_SECRET_BYTES} bytes")
        return key.encode()

    def resolve_jwt_private_key(self) -> bytes | None:
        """The PEM private key for EdDSA/ES256 (None with HS256): configured, read from its file,
        or (development only) generated once into the data directory with mode 0600."""
        if self.jwt.algorithm is JwtAlgorithm.HS256:
            return None
        if self.jwt.private_key is not None:
            return self.jwt.private_key.get_secret_value().encode()
        if self.jwt.private_key_file is not None:
            return self.jwt.private_key_file.read_bytes()
        algorithm = self.jwt.algorithm
        path = self.data_dir / f"jwt-{algorithm.value.lower()}.pem"
        _create_once(path, lambda: _new_private_key(algorithm))
        return path.read_bytes()


def describe(error: ValidationError) -> list[str]:
    """One line per problem, naming the environment variable (``REFERRAL_HTTP_PORT: ...``)
    rather than the field's place in the groups."""
    flat_of = {place: flat for flat, place in FLAT_NAMES.items()}
    lines = []
    for problem in error.errors():
        location = [str(part) for part in problem["loc"]]
        flat = flat_of.get((location[0], location[1])) if len(location) >= 2 else None
        if flat is None and location and location[0] in _TOP_LEVEL:
            flat = location[0]
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"REFERRAL_{flat.upper()}: {message}" if flat else message)
    return lines


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _create_once(path: Path, make: Callable[[], bytes]) -> None:
    """Write ``make()`` to ``path`` (mode 0600) unless it exists: a private temporary file,
    then linked into place, so concurrent workers all end up with the same content. The data
    directory is created 0700."""
    private_directory(path.parent)
    if path.exists():
        private_file(path, create=False)  # one written by hand: 0600 like ours
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(make())
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def _new_private_key(algorithm: JwtAlgorithm) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    key = (
        ed25519.Ed25519PrivateKey.generate()
        if algorithm is JwtAlgorithm.EDDSA
        else ec.generate_private_key(ec.SECP256R1())
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
