"""Settings: the only place that reads the environment (``REFERRAL_*`` and ``.env``).

The defaults make ``make run`` work with no configuration: an SQLite file under ``./data/``,
the in-process cache, integrations off, and a JWT secret generated once into the data directory.
The ``production`` profile refuses to start with any of those insecure or local-only defaults.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Profile(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class HunterPolicy(StrEnum):
    """What registration does when Hunter cannot give a definite answer."""

    #: Accept the registration with ``is_verified=false``.
    FAIL_OPEN = "fail_open"
    #: Refuse it with UNAVAILABLE (EMAIL_VERIFICATION_UNAVAILABLE) and a RetryInfo.
    FAIL_CLOSED = "fail_closed"


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
RateSetting = Annotated[Rate, NoDecode, BeforeValidator(parse_rate)]


class Settings(BaseSettings):
    """Every knob of the service. Environment variables are the field names upper-cased with
    the ``REFERRAL_`` prefix, e.g. ``REFERRAL_DATABASE_URL``."""

    model_config = SettingsConfigDict(
        env_prefix="REFERRAL_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    profile: Profile = Profile.DEVELOPMENT

    # --- network -------------------------------------------------------------------------
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

    # --- HTTP gateway ----------------------------------------------------------------------
    # HTTP/JSON transcoding of the gRPC API (from the protos' google.api.http annotations),
    # /openapi.json, /docs (Swagger UI) and /healthz, served in the same process and loop.
    #: Serve the HTTP gateway at all.
    http_enabled: bool = True
    http_host: str = "127.0.0.1"
    #: 0 picks a free port (``App.http_port`` tells which).
    http_port: Annotated[int, Field(ge=0, le=65535)] = 8080
    #: Largest JSON request body accepted, in bytes (413 beyond).
    http_max_body_bytes: Annotated[int, Field(ge=1024)] = 256 * 1024
    #: Deadline of the gRPC call an HTTP request turns into, seconds (504 beyond).
    http_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    #: Origins allowed to call the API from a browser (CORS), comma-separated; ``*`` for any.
    #: Empty (default): no CORS headers, same-origin only.
    http_cors_origins: str = ""
    #: Serve /openapi.json and the /docs page.
    http_docs_enabled: bool = True

    # --- storage -------------------------------------------------------------------------
    data_dir: Path = Path("data")
    #: SQLAlchemy async URL. Default: SQLite file ``<data_dir>/referral.db``.
    database_url: str | None = None
    database_pool_size: Annotated[int, Field(ge=1)] = 10
    #: Seconds to wait for a database connection or statement before failing the call.
    database_timeout_seconds: Annotated[float, Field(gt=0)] = 5.0
    #: Redis URL (``redis://host:6379/0``). Unset: the in-process cache and stores.
    redis_url: str | None = None
    #: Prefix of every Redis key this service writes.
    redis_key_prefix: str = "referral:"
    #: Socket connect/read timeout for Redis, seconds. Keep it small: Redis is an accelerator.
    redis_timeout_seconds: Annotated[float, Field(gt=0)] = 0.25
    #: Consecutive Redis failures that open the circuit breaker.
    redis_breaker_threshold: Annotated[int, Field(ge=1)] = 3
    #: Seconds the breaker stays open before one trial call.
    redis_breaker_reset_seconds: Annotated[float, Field(gt=0)] = 5.0

    # --- tokens --------------------------------------------------------------------------
    #: HMAC secret for JWTs (at least 32 bytes). Required in production; in development a
    #: random secret is generated once into ``<data_dir>/jwt-secret``.
    jwt_secret: SecretStr | None = None
    jwt_issuer: str = "referral-service"
    jwt_audience: str = "referral-service"
    access_token_ttl: timedelta = timedelta(minutes=15)
    refresh_token_ttl: timedelta = timedelta(days=30)
    #: Clock skew tolerated when checking exp/nbf/iat, seconds.
    jwt_leeway_seconds: Annotated[int, Field(ge=0, le=300)] = 30

    # --- token keys ---------------------------------------------------------------------------
    #: Algorithm of newly issued tokens. ``HS256`` signs with ``jwt_secret``; ``EdDSA``
    #: (Ed25519) and ``ES256`` (P-256) sign with ``jwt_private_key`` and publish the public keys
    #: through ``AuthService.GetJwks`` so other services verify tokens without calling us.
    jwt_algorithm: JwtAlgorithm = JwtAlgorithm.HS256
    #: PEM private key (Ed25519 for EdDSA, P-256 for ES256). Required in production with an
    #: asymmetric algorithm; in development one is generated once into ``<data_dir>``.
    jwt_private_key: SecretStr | None = None
    #: ... or the file holding it (read at start-up).
    jwt_private_key_file: Path | None = None
    #: Earlier HMAC secrets whose tokens are still accepted (never used to sign): rotate
    #: ``jwt_secret`` by moving the old value here for one refresh-token lifetime.
    jwt_previous_secrets: list[SecretStr] = Field(default_factory=list)
    #: Earlier public (or private) keys, PEM, whose tokens are still accepted and which stay in
    #: the JWKS: rotate ``jwt_private_key`` by moving the old key here.
    jwt_previous_public_keys: list[str] = Field(default_factory=list)

    # --- passwords (argon2id; defaults are OWASP's minimum: m=19 MiB, t=2, p=1) -----------
    argon2_time_cost: Annotated[int, Field(ge=2)] = 2
    argon2_memory_kib: Annotated[int, Field(ge=19 * 1024)] = 19 * 1024
    argon2_parallelism: Annotated[int, Field(ge=1)] = 1
    #: Threads that hash passwords; default: one per core.
    hash_workers: Annotated[int, Field(ge=1)] = Field(default_factory=lambda: os.cpu_count() or 1)
    #: Hash jobs allowed to wait for a thread; beyond that callers wait without queueing work.
    hash_queue: Annotated[int, Field(ge=1)] = 256

    # --- referral codes ------------------------------------------------------------------
    #: Furthest a code's expiry may lie in the future.
    code_max_horizon: timedelta = timedelta(days=365)
    #: Lifetime of cached ``GetReferralCodeByEmail`` answers (never past the code's expiry).
    code_cache_ttl: timedelta = timedelta(minutes=5)
    #: Lifetime of cached "no live code" answers.
    code_negative_cache_ttl: timedelta = timedelta(seconds=30)
    list_default_page_size: Annotated[int, Field(ge=1)] = 50
    list_max_page_size: Annotated[int, Field(ge=1)] = 1000
    #: How long a request_id is remembered (AIP-155).
    request_id_ttl: timedelta = timedelta(days=1)
    #: How often each process purges expired revocations, request ids and refresh tokens.
    housekeeping_interval: timedelta = timedelta(hours=1)

    # --- integrations (all off by default) -------------------------------------------------
    # Email verification with Hunter's Email Verifier: on when REFERRAL_HUNTER_API_KEY is set.
    hunter_api_key: SecretStr | None = None
    hunter_base_url: str = "https://api.hunter.io/v2"
    hunter_policy: HunterPolicy = HunterPolicy.FAIL_OPEN
    #: TCP/TLS connect timeout per request, seconds.
    hunter_connect_timeout_seconds: Annotated[float, Field(gt=0)] = 1.0
    #: Timeout waiting for response bytes per request, seconds.
    hunter_read_timeout_seconds: Annotated[float, Field(gt=0)] = 3.0
    #: Upper bound on the whole verification, retries included: registration never waits
    #: longer than this for Hunter.
    hunter_total_timeout_seconds: Annotated[float, Field(gt=0)] = 5.0
    #: Requests per verification when Hunter answers 202/222 ("try again").
    hunter_max_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    #: First backoff between those attempts, doubled each time.
    hunter_retry_backoff_seconds: Annotated[float, Field(ge=0)] = 0.5
    #: How long definite answers (valid, accept_all, webmail, invalid, disposable) are cached.
    hunter_cache_ttl: timedelta = timedelta(days=1)
    #: Consecutive failures (timeouts, 401/403/429/5xx, bad JSON) that open the breaker.
    hunter_breaker_threshold: Annotated[int, Field(ge=1)] = 5
    #: Seconds the breaker stays open (registrations skip Hunter meanwhile).
    hunter_breaker_reset_seconds: Annotated[float, Field(gt=0)] = 30.0

    # Profile enrichment after registration, in the background.
    enrichment_provider: EnrichmentProviderName = EnrichmentProviderName.NONE
    enrichment_api_key: SecretStr | None = None
    #: Default: the provider's public API (https://person.clearbit.com,
    #: https://api.peopledatalabs.com).
    enrichment_base_url: str | None = None
    enrichment_connect_timeout_seconds: Annotated[float, Field(gt=0)] = 2.0
    enrichment_read_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    #: Lookups per user before giving up (state FAILED).
    enrichment_max_attempts: Annotated[int, Field(ge=1, le=20)] = 5
    #: First retry delay, doubled after each failed attempt up to ``enrichment_retry_max``.
    enrichment_retry_backoff: timedelta = timedelta(seconds=30)
    enrichment_retry_max: timedelta = timedelta(hours=1)
    #: Lookups running at once per process.
    enrichment_concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    #: How often the worker scans the database for due lookups (new registrations wake it at
    #: once; the scan picks up retries, restarts and other processes' leftovers).
    enrichment_poll_seconds: Annotated[float, Field(gt=0)] = 15.0
    #: A claimed lookup is invisible to other workers for this long; if the process dies, it
    #: becomes due again afterwards.
    enrichment_lease: timedelta = timedelta(minutes=2)
    enrichment_breaker_threshold: Annotated[int, Field(ge=1)] = 5
    enrichment_breaker_reset_seconds: Annotated[float, Field(gt=0)] = 60.0

    # --- rate limits --------------------------------------------------------------------------
    #: Master switch. Each limit is ``LIMIT/PERIOD`` (``10/15m``; ``off`` disables one), enforced
    #: with GCRA in Redis (atomic, shared by every worker and replica) or, without Redis or while
    #: it is down, in each process.
    rate_limits_enabled: bool = True
    #: Failed logins per account (email), whatever the client address.
    rate_limit_login_account: RateSetting = Rate(10, 900)
    #: Failed logins per client address.
    rate_limit_login_address: RateSetting = Rate(100, 900)
    #: Registrations (attempts) per client address.
    rate_limit_register_address: RateSetting = Rate(20, 3600)
    #: ``GetReferralCodeByEmail`` calls per client address.
    rate_limit_lookup_address: RateSetting = Rate(300, 60)
    #: Registrations naming a referral code that does not exist, per client address (guessing).
    rate_limit_code_check_address: RateSetting = Rate(30, 3600)
    #: Peers (CIDRs) whose ``rate_limit_client_address_header`` is believed, e.g. your load
    #: balancers. Anyone else's header is ignored and the TCP peer is the client.
    rate_limit_trusted_proxies: list[str] = Field(default_factory=list)
    #: Metadata carrying the client address when the peer is a trusted proxy (the right-most
    #: entry that is not itself a trusted proxy is used).
    rate_limit_client_address_header: str = "x-forwarded-for"
    #: IPv6 clients are limited per network of this prefix length (one host often owns a /64).
    rate_limit_ipv6_prefix: Annotated[int, Field(ge=32, le=128)] = 64

    # --- registration --------------------------------------------------------------------------
    #: Refuse addresses at known disposable-email domains (list from ``disposable-email-domains``).
    reject_disposable_emails: bool = True
    #: Extra domains to refuse, and domains to allow although the list names them.
    disposable_domains_extra: list[str] = Field(default_factory=list)
    disposable_domains_allowed: list[str] = Field(default_factory=list)

    # --- logging -------------------------------------------------------------------------
    log_level: str = "INFO"
    log_format: LogFormat = LogFormat.TEXT

    @field_validator(
        "redis_url",
        "database_url",
        "hunter_api_key",
        "enrichment_api_key",
        "enrichment_base_url",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator(
        "access_token_ttl",
        "refresh_token_ttl",
        "code_max_horizon",
        "code_cache_ttl",
        "code_negative_cache_ttl",
        "request_id_ttl",
        "housekeeping_interval",
        "hunter_cache_ttl",
        "enrichment_retry_backoff",
        "enrichment_retry_max",
        "enrichment_lease",
        mode="before",
    )
    @classmethod
    def _seconds_are_durations(cls, value: object) -> object:
        """Durations: ISO 8601 (``PT15M``), ``HH:MM:SS``, or a plain number of seconds."""
        if isinstance(value, str) and value.strip().replace(".", "", 1).isdigit():
            return float(value)
        return value

    @field_validator("hunter_base_url", "enrichment_base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("https://", "http://")) or "?" in value or "#" in value:
            raise ValueError("must be an http(s) URL without query or fragment")
        return value.rstrip("/")

    @property
    def hunter_enabled(self) -> bool:
        return self.hunter_api_key is not None

    @property
    def enrichment_enabled(self) -> bool:
        return self.enrichment_provider is not EnrichmentProviderName.NONE

    @field_validator("rate_limit_trusted_proxies")
    @classmethod
    def _check_cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)
        return value

    @model_validator(mode="after")
    def _check_profile(self) -> Settings:
        if (
            self.jwt_secret is not None
            and len(self.jwt_secret.get_secret_value().encode()) < MIN_SECRET_BYTES
        ):
            raise ValueError(f"REFERRAL_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes")
        if self.enrichment_enabled and self.enrichment_api_key is None:
            raise ValueError(
                f"REFERRAL_ENRICHMENT_PROVIDER={self.enrichment_provider.value} "
                "needs REFERRAL_ENRICHMENT_API_KEY"
            )
        if self.enrichment_lease.total_seconds() <= (
            self.enrichment_connect_timeout_seconds + self.enrichment_read_timeout_seconds
        ):
            raise ValueError("REFERRAL_ENRICHMENT_LEASE must exceed the connect + read timeouts")
        if self.profile is Profile.PRODUCTION:
            problems = []
            if self.jwt_secret is None:
                problems.append("REFERRAL_JWT_SECRET is not set")
            if self.database_url is None or self.database_url.startswith("sqlite"):
                problems.append("REFERRAL_DATABASE_URL must point at PostgreSQL")
            if self.redis_url is None:
                problems.append("REFERRAL_REDIS_URL is not set")
            # API keys travel in headers: never over plain HTTP in production.
            if self.hunter_enabled and not self.hunter_base_url.startswith("https://"):
                problems.append("REFERRAL_HUNTER_BASE_URL must be https")
            if self.enrichment_base_url is not None and not self.enrichment_base_url.startswith("https://"):
                problems.append("REFERRAL_ENRICHMENT_BASE_URL must be https")
            if (
                self.jwt_algorithm is not JwtAlgorithm.HS256
                and self.jwt_private_key is None
                and self.jwt_private_key_file is None
            ):
                problems.append("REFERRAL_JWT_PRIVATE_KEY (or _FILE) is not set")
            if problems:
                raise ValueError("production profile refuses insecure defaults: " + "; ".join(problems))
        for old in self.jwt_previous_secrets:
            if len(old.get_secret_value().encode()) < MIN_SECRET_BYTES:
                raise ValueError(
                    f"REFERRAL_JWT_PREVIOUS_SECRETS must be at least {MIN_SECRET_BYTES} bytes each"
                )
        if self.list_default_page_size > self.list_max_page_size:
            raise ValueError("list_default_page_size exceeds list_max_page_size")
        return self

    @property
    def effective_workers(self) -> int:
        return self.workers if self.workers is not None else (os.cpu_count() or 1)

    @property
    def shared_cache_needed(self) -> bool:
        """Several processes with no Redis: a per-process look-up cache would go stale."""
        return self.effective_workers > 1 and self.redis_url is None

    @property
    def http_cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.http_cors_origins.split(",") if origin.strip()]

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'referral.db'}"

    def resolve_jwt_secret(self) -> bytes:
        """The configured secret, or (development only) one generated once into the data
        directory with mode 0600, so restarts and worker processes share it."""
        if self.jwt_secret is not None:
            return self.jwt_secret.get_secret_value().encode()
        path = self.data_dir / "jwt-secret"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            # Write a private temporary file, then link it into place: atomic, and the first
            # process to link wins, so concurrent workers all end up with the same secret.
            tmp = path.with_name(f".jwt-secret.{os.getpid()}.{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(48) + "\n")
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        secret = path.read_text().strip()
        if len(secret) < MIN_SECRET_BYTES:
            raise RuntimeError(f"{path} holds a secret shorter than {MIN_SECRET_BYTES} bytes")
        return secret.encode()

    def resolve_jwt_private_key(self) -> bytes | None:
        """The PEM private key for EdDSA/ES256 (None with HS256): configured, read from its file,
        or (development only) generated once into the data directory with mode 0600."""
        if self.jwt_algorithm is JwtAlgorithm.HS256:
            return None
        if self.jwt_private_key is not None:
            return self.jwt_private_key.get_secret_value().encode()
        if self.jwt_private_key_file is not None:
            return self.jwt_private_key_file.read_bytes()
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519

        path = self.data_dir / f"jwt-{self.jwt_algorithm.value.lower()}.pem"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            key = (
                ed25519.Ed25519PrivateKey.generate()
                if self.jwt_algorithm is JwtAlgorithm.EDDSA
                else ec.generate_private_key(ec.SECP256R1())
            )
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(pem)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        return path.read_bytes()
