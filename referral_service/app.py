"""The composition root: the one place that turns Settings into a running service.

``build_app`` reads as the list of what the service is made of; each part has a small builder:

- the stores: the database (``SqlStore``) and the fast stores (Redis adapters sharing one
  transport, or their in-process twins);
- the services: token codec, password hasher, integrations, the use cases of the domain;
- the transports: the request pipeline (``pipeline/``), the gRPC server (``api/``) and the
  HTTP/JSON gateway (``gateway/``), both handing calls to the same servicers through it.

``App`` owns their lifecycle: start (the database first: one line and exit 1 when it does not
answer within the start-up wait), housekeeping, health, metrics, tracing, graceful stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from referral.v1 import auth_pb2, auth_pb2_grpc, events_pb2, events_pb2_grpc, referral_pb2, referral_pb2_grpc

from referral_service import metrics
from referral_service.api import reflection
from referral_service.api.auth import AuthServicer
from referral_service.api.events import EventServicer
from referral_service.api.health import GracefulHealthServicer, HealthReporter
from referral_service.api.interceptors import ApiInterceptor
from referral_service.api.referral import ReferralServicer
from referral_service.config import ClientAuth, EnrichmentProviderName, HunterPolicy, JwtAlgorithm, Settings
from referral_service.crypto.jwt import JwtCodec, TokenConfig, TokenKey, hmac_key, pem_key
from referral_service.crypto.passwords import Argon2Params, Argon2PasswordHasher
from referral_service.domain.accounts import AccountEmails, MailTokenPolicy
from referral_service.domain.auth import AuthService
from referral_service.domain.clock import utcnow
from referral_service.domain.enrichment import EnrichmentWorker, queue_lookup
from referral_service.domain.events import EventFeed, EventService
from referral_service.domain.mail import MailWorker
from referral_service.domain.models import ClientInfo, Principal, User
from referral_service.domain.ports import (
    EmailVerifier,
    KeyValueCache,
    Mailer,
    ProfileProvider,
    RateLimiter,
    RevocationCache,
    UnitOfWork,
    VersionedCache,
)
from referral_service.domain.referrals import ReferralService, code_by_email_cache_key
from referral_service.domain.revocations import Revocations
from referral_service.domain.rewards import NO_PROGRAM, Program, RewardService, RulesError, parse_rules
from referral_service.domain.service_accounts import SCOPES, ServiceAccountService
from referral_service.domain.validation import DisposableDomains
from referral_service.domain.verification import EmailVerification
from referral_service.domain.webhooks import WebhookService, WebhookWorker
from referral_service.gateway import HttpGateway, bind
from referral_service.gateway.probes import Probes
from referral_service.gateway.server import MetricsServer
from referral_service.integrations.webhooks import HttpWebhookSender
from referral_service.memory.cache import MemoryCache, NoCache
from referral_service.memory.limiter import MemoryRateLimiter
from referral_service.memory.revocations import MemoryRevocations
from referral_service.pipeline.address import ClientAddress
from referral_service.pipeline.auth import Authentication
from referral_service.pipeline.call import Call
from referral_service.pipeline.chain import Pipeline
from referral_service.pipeline.limits import RateLimits
from referral_service.resilience import CircuitBreaker
from referral_service.startup import StartupError
from referral_service.storage.db import Database, DatabaseUnreachable
from referral_service.storage.listen import EventListener
from referral_service.storage.store import SqlStore
from referral_service.storage.webhooks import SqlWebhooks
from referral_service.tls import TlsError, TlsFiles, grpc_credentials, http_context
from referral_service.tracing import Tracing

log = logging.getLogger("referral_service")

SERVICES = (
    auth_pb2.DESCRIPTOR.services_by_name["AuthService"],
    referral_pb2.DESCRIPTOR.services_by_name["ReferralService"],
    events_pb2.DESCRIPTOR.services_by_name["EventService"],
)
#: Health of the backing stores and providers, reported under these service names.
HEALTH_REDIS = "referral-service.redis"
HEALTH_DATABASE = "referral-service.database"
HEALTH_HUNTER = "referral-service.hunter"
HEALTH_ENRICHMENT = "referral-service.enrichment"

try:
    VERSION = version("referral-service")
except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    VERSION = "0"


# --- stores ------------------------------------------------------------------------------------


@dataclass
class FastStores:
    """The fast stores the use cases and the limits use: the Redis adapters sharing one
    transport, or their in-process twins."""

    cache: VersionedCache
    values: KeyValueCache
    revocations: RevocationCache
    limiter: RateLimiter
    #: "redis" or "memory", for the logs.
    backend: str
    #: Whether the backing store answers (the in-process twins always do).
    ping: Callable[[], Awaitable[bool]]
    #: Stops background work and closes connections.
    close: Callable[[], Awaitable[None]]
    #: Starts a look-up of the versioned cache early (``RedisCache.prefetch``), so that it
    #: shares the rate limit's round trip; None when there is no round trip to share.
    prefetch: Callable[[str], None] | None = None


def build_fast_stores(
    settings: Settings, on_health_change: Callable[[bool], None] | None = None, tracing: Tracing | None = None
) -> FastStores:
    """With ``REFERRAL_REDIS_URL``: one Redis transport shared by the four Redis adapters.
    Without it: the in-process twins; with several workers, the look-up cache never stores (a
    worker's copy could serve a code another worker deleted)."""
    if settings.redis.url:
        # Imported here: a deployment without Redis does not pay for the client (~5 MB per worker).
        from referral_service.redis.cache import RedisCache
        from referral_service.redis.limiter import RedisRateLimiter
        from referral_service.redis.revocations import RedisRevocations
        from referral_service.redis.transport import RedisTransport

        transport = RedisTransport(
            settings.redis.url,
            prefix=settings.redis.key_prefix,
            timeout=settings.redis.timeout_seconds,
            breaker_threshold=settings.redis.breaker_threshold,
            breaker_reset_seconds=settings.redis.breaker_reset_seconds,
            on_health_change=on_health_change,
            spans=tracing.redis_spans(settings.redis.url) if tracing is not None else None,
        )
        if tracing is not None:
            tracing.instrument_redis()
        cache = RedisCache(transport)

        async def close() -> None:
            await cache.close()
            await transport.close()

        return FastStores(
            cache=cache,
            values=cache,
            revocations=RedisRevocations(transport),
            limiter=RedisRateLimiter(transport, fallback=MemoryRateLimiter()),
            backend="redis",
            ping=transport.ping,
            close=close,
            prefetch=cache.prefetch,
        )

    async def always_up() -> bool:
        return True

    async def nothing_to_close() -> None:
        return None

    memory = MemoryCache()
    return FastStores(
        cache=NoCache() if settings.shared_cache_needed else memory,
        values=memory,
        revocations=MemoryRevocations(),
        limiter=MemoryRateLimiter(),
        backend="memory",
        ping=always_up,
        close=nothing_to_close,
    )


# --- services ------------------------------------------------------------------------------------


def build_token_keys(settings: Settings, secret: bytes) -> tuple[TokenKey, list[TokenKey]]:
    """The signing key and the verification-only keys (rotation) from the settings."""
    jwt = settings.jwt
    previous = [hmac_key(old.get_secret_value().encode(), signing=False) for old in jwt.previous_secrets]
    previous += [pem_key(pem.encode(), signing=False) for pem in jwt.previous_public_keys]
    if jwt.algorithm is JwtAlgorithm.HS256:
        return hmac_key(secret), previous
    pem = settings.resolve_jwt_private_key()
    assert pem is not None
    signing = pem_key(pem)
    if signing.algorithm != jwt.algorithm.value:
        raise ValueError(
            f"REFERRAL_JWT_ALGORITHM is {jwt.algorithm.value} but the private key is for {signing.algorithm}"
        )
    return signing, previous


def build_token_codec(settings: Settings, secret: bytes) -> JwtCodec:
    signing_key, verification_keys = build_token_keys(settings, secret)
    return JwtCodec(
        TokenConfig(
            signing_key=signing_key,
            verification_keys=verification_keys,
            issuer=settings.jwt.issuer,
            audience=settings.jwt.audience,
            access_ttl=settings.jwt.access_token_ttl,
            refresh_ttl=settings.jwt.refresh_token_ttl,
            leeway_seconds=settings.jwt.leeway_seconds,
        )
    )


def build_hasher(settings: Settings) -> Argon2PasswordHasher:
    passwords = settings.passwords
    return Argon2PasswordHasher(
        Argon2Params(passwords.argon2_time_cost, passwords.argon2_memory_kib, passwords.argon2_parallelism),
        workers=passwords.hash_workers,
        queue=passwords.hash_queue,
    )


#: Outbound HTTP clients: the tracing hook (None when tracing is off) and a callback factory for
#: each provider's breaker (its health entry).
Instrument = Callable[[Any], None]
BreakerWatch = Callable[[str, str], Callable[[bool], None]]


def build_verifier(
    settings: Settings, instrument: Instrument | None = None, watch: BreakerWatch | None = None
) -> EmailVerifier | None:
    hunter = settings.hunter
    if hunter.api_key is None:
        return None
    # The HTTP client (httpx, ~4 MB with what it imports) is loaded only when a provider is on.
    from referral_service.integrations import http
    from referral_service.integrations.hunter import HunterVerifier

    return HunterVerifier(
        http.client(
            provider="hunter",
            connect_timeout=hunter.connect_timeout_seconds,
            read_timeout=hunter.read_timeout_seconds,
            instrument=instrument,
        ),
        base_url=hunter.base_url,
        api_key=hunter.api_key.get_secret_value(),
        total_timeout=hunter.total_timeout_seconds,
        max_attempts=hunter.max_attempts,
        retry_backoff=hunter.retry_backoff_seconds,
        breaker=CircuitBreaker(
            hunter.breaker_threshold,
            hunter.breaker_reset_seconds,
            watch("hunter", HEALTH_HUNTER) if watch is not None else None,
            name="hunter",
            fallback=f"registrations skip email verification ({hunter.policy.value})",
        ),
    )


def build_profile_provider(
    settings: Settings, instrument: Instrument | None = None, watch: BreakerWatch | None = None
) -> ProfileProvider | None:
    enrichment = settings.enrichment
    if enrichment.provider is EnrichmentProviderName.NONE:
        return None
    assert enrichment.api_key is not None  # checked by Settings
    from referral_service.integrations import enrichment as providers
    from referral_service.integrations import http

    kinds: dict[EnrichmentProviderName, tuple[type[providers.ClearbitProvider], str]] = {
        EnrichmentProviderName.CLEARBIT: (providers.ClearbitProvider, providers.CLEARBIT_URL),
        EnrichmentProviderName.PEOPLEDATALABS: (
            providers.PeopleDataLabsProvider,  # type: ignore[dict-item]
            providers.PEOPLEDATALABS_URL,
        ),
    }
    kind, default_url = kinds[enrichment.provider]
    return kind(
        http.client(
            provider=enrichment.provider.value,
            connect_timeout=enrichment.connect_timeout_seconds,
            read_timeout=enrichment.read_timeout_seconds,
            max_connections=enrichment.concurrency,
            instrument=instrument,
        ),
        base_url=enrichment.base_url or default_url,
        api_key=enrichment.api_key.get_secret_value(),
        breaker=CircuitBreaker(
            enrichment.breaker_threshold,
            enrichment.breaker_reset_seconds,
            watch("enrichment", HEALTH_ENRICHMENT) if watch is not None else None,
            name=enrichment.provider.value,
            fallback="profile lookups wait",
        ),
    )


@dataclass
class Services:
    """The domain's use cases and what they run on besides the stores."""

    tokens: JwtCodec
    hasher: Argon2PasswordHasher
    revocations: Revocations
    auth: AuthService
    referrals: ReferralService
    #: Email verification provider; None when off.
    verifier: EmailVerifier | None
    #: Background profile enrichment; None when off.
    enrichment: EnrichmentWorker | None
    service_accounts: ServiceAccountService
    #: Email ownership and password reset, and the worker sending their messages.
    accounts: AccountEmails
    mail: MailWorker
    #: The referral programme: conversions, the reward ledger.
    rewards: RewardService
    #: This process's follower of new events (started with the server).
    event_feed: EventFeed
    events: EventService
    webhooks: WebhookService
    #: Sends the webhooks in the background (started with the server).
    webhook_worker: WebhookWorker


def build_program(settings: Settings) -> Program:
    """The referral programme from ``REFERRAL_REWARDS_RULES_FILE`` (none when unset);
    StartupError naming the file and every problem when it is invalid."""
    path = settings.rewards.rules_file
    if path is None:
        return NO_PROGRAM
    try:
        return parse_rules(path.read_text(encoding="utf-8"), f"REFERRAL_REWARDS_RULES_FILE ({path})")
    except (OSError, UnicodeError) as error:
        raise StartupError(f"REFERRAL_REWARDS_RULES_FILE ({path}): cannot be read: {error}") from None
    except RulesError as error:
        raise StartupError(str(error)) from None


def build_services(
    settings: Settings,
    store: SqlStore,
    fast: FastStores,
    secret: bytes,
    instrument: Instrument | None = None,
    watch: BreakerWatch | None = None,
) -> Services:
    """The use cases. The look-up cache and the verification answers are counted (hits,
    misses) in the metrics."""
    tokens = build_token_codec(settings, secret)
    hasher = build_hasher(settings)
    revocations = Revocations(store, fast.revocations)
    codes = settings.codes
    referrals = ReferralService(
        store,
        metrics.CountingCache(fast.cache, "referral_code_by_email"),
        page_secret=secret,
        max_horizon=codes.max_horizon,
        cache_ttl=codes.cache_ttl,
        negative_cache_ttl=codes.negative_cache_ttl,
        default_page_size=codes.list_default_page_size,
        max_page_size=codes.list_max_page_size,
        request_id_ttl=settings.server.request_id_ttl,
    )
    verifier = build_verifier(settings, instrument, watch)
    verification = (
        EmailVerification(
            verifier,
            metrics.CountingValues(fast.values, "email_verification"),
            fail_closed=settings.hunter.policy is HunterPolicy.FAIL_CLOSED,
            cache_ttl=settings.hunter.cache_ttl,
        )
        if verifier is not None
        else None
    )
    provider = build_profile_provider(settings, instrument, watch)
    enrichment = (
        EnrichmentWorker(
            store,
            provider,
            max_attempts=settings.enrichment.max_attempts,
            retry_backoff=settings.enrichment.retry_backoff,
            retry_max=settings.enrichment.retry_max,
            concurrency=settings.enrichment.concurrency,
            poll_seconds=settings.enrichment.poll_seconds,
            lease=settings.enrichment.lease,
        )
        if provider is not None
        else None
    )
    registration = settings.registration
    mail = build_mail_worker(settings, store)
    auth = AuthService(
        store,
        hasher,
        tokens,
        revocations,
        request_id_ttl=settings.server.request_id_ttl,
        on_code_used=referrals.code_used,
        verification=verification,
        on_mail_queued=mail.notify,
        disposable_domains=(
            DisposableDomains(registration.disposable_domains_extra, registration.disposable_domains_allowed)
            if registration.reject_disposable_emails
            else None
        ),
        max_sessions_per_user=settings.jwt.max_sessions_per_user,
    )
    service_accounts = ServiceAccountService(store, tokens, revocations, settings.resolve_client_secret_key())
    accounts = AccountEmails(
        store,
        hasher,
        end_sessions=auth.end_user_sessions_in,
        publish_revocations=auth.publish_revocations,
        on_mail_queued=mail.notify,
    )
    rewards = RewardService(
        store,
        build_program(settings),
        page_secret=secret,
        default_page_size=codes.list_default_page_size,
        max_page_size=codes.list_max_page_size,
        disposable=DisposableDomains(
            registration.disposable_domains_extra, registration.disposable_domains_allowed
        ).__contains__,
    )
    if enrichment is not None:
        accounts.add_on_verified(queue_lookup, enrichment.notify)

    async def qualify_referral(uow: UnitOfWork, user: User, now: datetime) -> None:
        # A referral waits for its referee's verification: conversions recorded meanwhile count
        # now, in the verifying transaction (on the programme's clock).
        await rewards.referee_verified(uow, user.id, rewards.clock())

    accounts.add_on_verified(qualify_referral)
    feed = EventFeed(store, poll_seconds=settings.events.poll_seconds)
    events = EventService(store, feed, progress_seconds=settings.events.progress_seconds)
    hooks = settings.webhooks
    webhook_store = SqlWebhooks(store)
    worker = WebhookWorker(
        webhook_store,
        HttpWebhookSender(
            allow_private=hooks.allow_private,
            connect_timeout=min(hooks.timeout_seconds, 5.0),
            read_timeout=hooks.timeout_seconds,
            instrument=instrument,
        ),
        max_attempts=hooks.max_attempts,
        retry_base=hooks.retry_backoff,
        retry_max=hooks.retry_max,
        disable_after=hooks.disable_after_failures,
        poll_seconds=hooks.poll_seconds,
        concurrency=hooks.concurrency,
    )

    webhooks = WebhookService(
        store, webhook_store, allow_private=hooks.allow_private, on_endpoints_changed=worker.endpoints_changed
    )

    def committed() -> None:
        feed.nudge()
        worker.notify()

    store.on_events = committed
    return Services(
        tokens,
        hasher,
        revocations,
        auth,
        referrals,
        verifier,
        enrichment,
        service_accounts,
        accounts,
        mail,
        rewards,
        feed,
        events,
        webhooks,
        worker,
    )


def build_mailer(settings: Settings) -> Mailer:
    """SMTP when ``REFERRAL_SMTP_URL`` is set, else a local mail directory."""
    from referral_service.integrations import mail as adapters

    config = settings.mail
    builder = adapters.MessageBuilder(config.sender, config.product_name)
    if config.smtp_url is not None:
        return adapters.SmtpMailer(
            adapters.parse_smtp_url(config.smtp_url.get_secret_value()),
            builder,
            timeout=config.smtp_timeout_seconds,
            ca_file=config.smtp_ca_file,
        )
    return adapters.MaildirMailer(settings.resolve_mail_dir(), builder)


def build_mail_worker(settings: Settings, store: SqlStore) -> MailWorker:
    config = settings.mail
    return MailWorker(
        store,
        build_mailer(settings),
        MailTokenPolicy(
            verify_ttl=config.verification_ttl,
            reset_ttl=config.reset_ttl,
            verify_link=config.verify_link_template,
            reset_link=config.reset_link_template,
        ),
        retry_backoff=config.retry_backoff,
        retry_max=config.retry_max,
        max_attempts=config.max_attempts,
        concurrency=config.concurrency,
        poll_seconds=config.poll_seconds,
        lease=config.lease,
        on_outcome=lambda kind, outcome: metrics.MAIL_MESSAGES.labels(kind=kind, outcome=outcome).inc(),
    )


# --- transports ----------------------------------------------------------------------------------


def client_address(settings: Settings) -> ClientAddress:
    """Who the client is, from the TCP peer and (from trusted proxies only) the forwarded header."""
    limits = settings.rate_limits
    return ClientAddress(limits.trusted_proxies, limits.client_address_header, limits.ipv6_prefix)


def client_of(settings: Settings) -> Callable[[Call], ClientInfo]:
    """A call -> where it comes from, as a login session records it."""
    address = client_address(settings)

    def of(call: Call) -> ClientInfo:
        return ClientInfo(address.client_ip(call.peer, call.forwarded), (call.user_agent or "")[:256])

    return of


def _certificate_accounts(
    settings: Settings, service_accounts: ServiceAccountService
) -> Callable[[str], Awaitable[Principal | None]] | None:
    """Client certificate identity -> its service account's principal, as the TLS settings map
    them (None when they map none)."""
    mapped = dict(settings.tls.service_accounts)
    if not mapped:
        return None

    async def by_certificate(identity: str) -> Principal | None:
        name = mapped.get(identity)
        return None if name is None else await service_accounts.principal(name)

    return by_certificate


def build_pipeline(
    settings: Settings,
    auth: AuthService,
    limiter: RateLimiter,
    trust: KeyValueCache,
    service_accounts: ServiceAccountService,
    prefetch: Callable[[str], None] | None = None,
) -> Pipeline:
    """Authentication from ``(referral.v1.access)``, the limits the protos declare with
    ``(referral.v1.rate_limit)`` at the configured rates, error mapping, access log."""
    limits = settings.rate_limits
    address = client_address(settings)
    try:
        rate_limits = (
            RateLimits.from_services(
                SERVICES,
                limits.rates(),
                limiter,
                address,
                trust,
                limits.trust_ttl.total_seconds(),
                limits.service_rates,
                _prefetches(prefetch),
            )
            if limits.enabled
            else None
        )
        authentication = Authentication.from_services(
            SERVICES, auth.authenticate, SCOPES, _certificate_accounts(settings, service_accounts)
        )
    except RuntimeError as error:
        raise StartupError(str(error)) from None
    return Pipeline(authentication, rate_limits)


def _prefetches(prefetch: Callable[[str], None] | None) -> dict[str, Callable[[Any], None]]:
    """The cached look-up's cache read starts before its rate limit is taken: both scripts
    leave in one batch, one Redis round trip per call."""
    if prefetch is None:
        return {}

    def code_by_email(request: Any) -> None:
        key = code_by_email_cache_key(request.email)
        if key is not None:
            prefetch(key)

    return {"/referral.v1.ReferralService/GetReferralCodeByEmail": code_by_email}


@dataclass(frozen=True)
class Servicers:
    """proto <-> domain for each service; both transports call these."""

    auth: AuthServicer
    referral: ReferralServicer
    events: EventServicer

    def by_service(self) -> dict[ServiceDescriptor, object]:
        return {SERVICES[0]: self.auth, SERVICES[1]: self.referral, SERVICES[2]: self.events}


def build_tls_files(settings: Settings) -> TlsFiles | None:
    tls = settings.tls
    if tls.cert_file is None or tls.key_file is None:
        return None
    return TlsFiles(tls.cert_file, tls.key_file, tls.client_ca_file)


def check_tls_files(settings: Settings) -> None:
    """Read and check the TLS files once: the supervisor does, before starting workers that
    would each fail on them."""
    files = build_tls_files(settings)
    if files is None:
        return
    try:
        files.read()
    except TlsError as error:
        raise StartupError(f"TLS: {error}") from None


_VERIFY_MODES = {
    ClientAuth.NONE: ssl.CERT_NONE,
    ClientAuth.OPTIONAL: ssl.CERT_OPTIONAL,
    ClientAuth.REQUIRE: ssl.CERT_REQUIRED,
}


def build_grpc_server(
    settings: Settings,
    pipeline: Pipeline,
    servicers: Servicers,
    health: GracefulHealthServicer,
    tracing: Tracing | None = None,
) -> tuple[grpc.aio.Server, int]:
    """The gRPC transport, bound to its port (not started): TLS when the certificate files
    are set (reloaded when they change), with client certificates required when
    ``tls_client_auth`` is ``require``. With tracing, the server span's interceptor comes
    first, so the pipeline runs inside the span."""
    files = build_tls_files(settings)
    mtls = files is not None and settings.tls.client_auth is ClientAuth.REQUIRE
    try:
        credentials = grpc_credentials(files, require_client_certificate=mtls) if files is not None else None
    except TlsError as error:
        raise StartupError(f"gRPC TLS: {error}") from None
    interceptors: list[grpc.aio.ServerInterceptor] = [ApiInterceptor(pipeline, client_certificates=mtls)]
    if tracing is not None:
        interceptors.insert(0, tracing.grpc_interceptor())
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", settings.server.max_message_bytes),
            ("grpc.max_send_message_length", 4 * 1024 * 1024),
            ("grpc.so_reuseport", 1 if settings.server.so_reuseport else 0),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ],
    )
    auth_pb2_grpc.add_AuthServiceServicer_to_server(servicers.auth, server)
    referral_pb2_grpc.add_ReferralServiceServicer_to_server(servicers.referral, server)
    events_pb2_grpc.add_EventServiceServicer_to_server(servicers.events, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    # v1 and v1alpha, with the proto comments (api/reflection.py)
    reflection.enable(
        server,
        [*(s.full_name for s in SERVICES), health_pb2.DESCRIPTOR.services_by_name["Health"].full_name],
    )
    address = f"{settings.server.grpc_host}:{settings.server.grpc_port}"
    try:
        port = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError:
        port = 0
    if port == 0:
        raise StartupError(f"cannot listen on {address}: the address is in use or not available")
    return server, port


def build_probes(
    settings: Settings, health: HealthReporter, on_api_port: bool, metrics_dir: str | None
) -> Probes:
    """The health probes, with ``/metrics`` where it is served: on the metrics port when it is
    set, else on the HTTP port."""
    serve_metrics = settings.metrics.enabled and (settings.metrics.port is None) == on_api_port
    return Probes(
        status=lambda: health_pb2.HealthCheckResponse.ServingStatus.Name(health.servicer.status()),
        components=health.components,
        metrics=metrics.exposition(metrics_dir) if serve_metrics else None,
    )


def build_metrics_server(
    settings: Settings, health: HealthReporter, metrics_dir: str | None
) -> MetricsServer | None:
    """The metrics port (``REFERRAL_METRICS_PORT``), bound (not started); None when unset."""
    if not settings.metrics.enabled or settings.metrics.port is None:
        return None
    host, port = settings.metrics.host, settings.metrics.port
    try:
        sock = bind(host, port, reuse_port=settings.server.so_reuseport)
    except OSError as error:
        raise StartupError(
            f"cannot listen on the metrics port {host}:{port}: {error.strerror or error}"
        ) from None
    return MetricsServer(sock, build_probes(settings, health, on_api_port=False, metrics_dir=metrics_dir))


def build_http_gateway(
    settings: Settings,
    pipeline: Pipeline,
    servicers: Servicers,
    probes: Probes,
    tracing: Tracing | None = None,
) -> HttpGateway | None:
    """The HTTP/JSON transport, bound to its port (not started); None when off."""
    http = settings.http
    if not http.enabled:
        return None
    files = build_tls_files(settings)
    try:
        context = (
            http_context(files, _VERIFY_MODES[settings.tls.effective_http_client_auth])
            if files is not None
            else None
        )
    except TlsError as error:
        raise StartupError(f"HTTP TLS: {error}") from None
    try:
        sock = bind(http.host, http.port, reuse_port=settings.server.so_reuseport)
    except OSError as error:
        raise StartupError(
            f"cannot listen on HTTP {http.host}:{http.port}: {error.strerror or error}"
        ) from None
    return HttpGateway(
        sock,
        invokers=pipeline.handlers(servicers.by_service(), timeout=http.timeout_seconds),
        probes=probes,
        spans=tracing.http_server_spans() if tracing is not None else None,
        max_body_bytes=http.max_body_bytes,
        cors_origins=http.cors_origin_list,
        docs_enabled=http.docs_enabled,
        client_address_header=pipeline.client_address_header,
        ssl_context=context,
    )


# --- the service ---------------------------------------------------------------------------------


@dataclass
class App:
    settings: Settings
    db: Database
    store: SqlStore
    stores: FastStores
    services: Services
    health: HealthReporter
    server: grpc.aio.Server
    port: int
    #: The HTTP/JSON gateway (None when REFERRAL_HTTP_ENABLED is false).
    http: HttpGateway | None = None
    #: The metrics port (None unless REFERRAL_METRICS_PORT is set).
    metrics_server: MetricsServer | None = None
    #: OpenTelemetry (None when REFERRAL_TRACING_ENABLED is false).
    tracing: Tracing | None = None
    _housekeeper: asyncio.Task[None] | None = None
    #: PostgreSQL only: wakes the event feed and webhook worker on other workers' commits.
    event_listener: EventListener | None = None
    #: Set once start() has begun serving: a process stopped before (a failed start-up, or a
    #: sibling worker's failure ending it) leaves the one line the operator reads alone.
    _serving: bool = False
    #: Flushes the per-process metric accumulators (``metrics.py``); made by ``build_app``.
    metrics_flusher: metrics.Flusher | None = None

    @property
    def auth(self) -> AuthService:
        return self.services.auth

    @property
    def referrals(self) -> ReferralService:
        return self.services.referrals

    @property
    def verifier(self) -> EmailVerifier | None:
        return self.services.verifier

    @property
    def enrichment(self) -> EnrichmentWorker | None:
        return self.services.enrichment

    @property
    def address(self) -> str:
        return f"{self.settings.server.grpc_host}:{self.port}"

    @property
    def http_port(self) -> int | None:
        """The bound HTTP port (useful with REFERRAL_HTTP_PORT=0)."""
        return self.http.port if self.http is not None else None

    async def housekeeping(self) -> int:
        """Purge expired revocations, request ids and refresh tokens, and events past their
        retention; returns rows deleted."""
        now = utcnow()
        retained = now - self.settings.events.retention

        async def purge(uow: UnitOfWork) -> int:
            return await uow.purge_expired(now) + await uow.events.purge(retained)

        return await self.store.transact(purge)

    async def _housekeeping_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.server.housekeeping_interval.total_seconds())
            try:
                deleted = await self.housekeeping()
            except Exception:
                log.warning("housekeeping failed; retrying at the next interval", exc_info=True)
            else:
                if deleted:
                    log.info("housekeeping purged %d expired rows", deleted)

    def _untraced(self) -> contextlib.AbstractContextManager[None]:
        """No spans for the health checks (start-up's and the background probe's)."""
        return self.tracing.suppressed() if self.tracing is not None else contextlib.nullcontext()

    async def start(self) -> None:
        """Wait for the database (``REFERRAL_DATABASE_STARTUP_TIMEOUT_SECONDS``; StartupError
        when it does not answer), then serve."""
        try:
            with self._untraced():
                await self.db.wait_until_reachable(self.settings.database.startup_timeout_seconds)
        except DatabaseUnreachable as error:
            raise StartupError(str(error)) from None
        if self.stores.revocations.shared:
            await self.services.revocations.resync()
        if self.metrics_flusher is not None:
            self.metrics_flusher.start()
        if self.db.dialect == "postgresql":
            feed, worker = self.services.event_feed, self.services.webhook_worker

            def notified() -> None:
                feed.nudge()
                worker.notify()

            self.event_listener = EventListener(self.db, notified)
            self.event_listener.start()
        self.services.event_feed.start()
        # Sends what earlier runs left pending (shutdown, crash) at once.
        self.services.webhook_worker.start()
        await self.server.start()
        self._serving = True
        self._housekeeper = asyncio.get_running_loop().create_task(self._housekeeping_loop())
        if self.enrichment is not None:
            # Picks up lookups left pending by an earlier run (shutdown, crash) at once.
            self.enrichment.start()
        # Likewise the messages left in the mail queue. Its scans every few seconds are not
        # traced (the task inherits this context).
        with self._untraced():
            self.services.mail.start()
        mailer = self.services.mail.mailer
        if mailer.name == "maildir":
            log.info(
                "no REFERRAL_SMTP_URL: messages are written to %s (a Maildir)",
                getattr(mailer, "directory", "?"),
            )
        fast_ping = self.stores.ping if self.stores.backend == "redis" else None
        # The background probe (a task made here) is not traced: a trace every few seconds.
        with self._untraced():
            await self.health.serving(self.db.check, await self.stores.ping(), fast_ping)
        metrics.started(VERSION)
        if self.metrics_server is not None:
            await self.metrics_server.start()
            log.info(
                "serving metrics on http://%s:%d/metrics",
                self.settings.metrics.host,
                self.metrics_server.port,
            )
        tls = self.settings.tls
        if self.http is not None:
            await self.http.start()
            log.info(
                "serving HTTP/JSON on %s://%s:%d (docs: /docs, OpenAPI: /openapi.json%s)",
                self.http.scheme,
                self.settings.http.host,
                self.http.port,
                f"; client certificates: {tls.effective_http_client_auth.value}" if tls.enabled else "",
            )
        log.info(
            "serving gRPC on %s%s (database: %s, cache: %s)",
            self.address,
            f" with TLS (client certificates: {tls.client_auth.value})" if tls.enabled else " in plaintext",
            self.db.dialect,
            self.stores.backend,
        )
        exposed = self.settings.plaintext_exposed()
        if exposed:
            log.warning(
                "plaintext on a non-loopback address (%s): set REFERRAL_TLS_CERT_FILE and "
                "REFERRAL_TLS_KEY_FILE unless a proxy or mesh sidecar terminates TLS in front",
                ", ".join(exposed),
            )

    async def stop(self, grace: float | None = None, drain: float | None = None) -> None:
        """Report NOT_SERVING, keep serving for the drain period so that watchers notice, stop
        accepting calls and let in-flight ones finish within the grace period, then close the
        stores."""
        grace = self.settings.server.shutdown_grace_seconds if grace is None else grace
        drain = self.settings.server.shutdown_drain_seconds if drain is None else drain
        if self._housekeeper is not None:
            self._housekeeper.cancel()
        await self.health.shutting_down()
        await asyncio.sleep(drain)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self.http is not None:
            await self.http.stop(grace)
        remaining = max(deadline - loop.time(), 0.0)
        # Refuse new calls and let in-flight ones finish within the grace time (health watch
        # streams end by themselves, see api/health.py). Running enrichment lookups share the
        # same grace period; those still running at its end are handed back to the database.
        enrichment = self.enrichment
        enrichment_stopping = loop.create_task(enrichment.stop(remaining)) if enrichment is not None else None
        mail_stopping = loop.create_task(self.services.mail.stop(remaining))
        await self.server.stop(remaining)
        await self.services.event_feed.stop()
        if self.event_listener is not None:
            await self.event_listener.stop()
        await self.services.webhook_worker.stop()
        await self.services.webhook_worker.sender.close()
        if self.metrics_server is not None:  # scrapes answer until the calls have drained
            await self.metrics_server.stop(0)
        if enrichment_stopping is not None and enrichment is not None:
            await enrichment_stopping
            await enrichment.provider.close()
        await mail_stopping
        await self.services.mail.mailer.close()
        if self.verifier is not None:
            await self.verifier.close()
        if self.metrics_flusher is not None:  # the last calls' counts, before the process ends
            await self.metrics_flusher.stop()
        await self.services.revocations.close()
        await self.stores.close()
        await self.db.dispose()
        self.services.hasher.close()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # flushes the last spans
        if self._serving:
            log.info("stopped")


async def build_app(
    settings: Settings, *, metrics_dir: str | None = None, span_exporter: Any | None = None
) -> App:
    """Build the service and bind its ports (not started yet). ``metrics_dir``: the workers'
    shared metrics directory (several workers); ``span_exporter``: tests collect spans with it
    (tracing on)."""
    tracing: Tracing | None = None
    if settings.tracing.enabled:
        from referral_service import tracing as tracing_setup

        tracing = tracing_setup.start(VERSION, span_exporter)
    health = HealthReporter(
        GracefulHealthServicer(),
        [service.full_name for service in SERVICES],
        database=HEALTH_DATABASE,
        fast_stores=HEALTH_REDIS,
        probe_interval=settings.server.health_probe_interval_seconds,
    )
    db = Database(
        settings.effective_database_url,
        pool_size=settings.database.pool_size,
        timeout=settings.database.timeout_seconds,
        on_unavailable=health.database_failed,
    )
    if tracing is not None:
        tracing.instrument_database(
            [db.engine, db.write_engine] if db.write_engine is not db.engine else [db.engine]
        )
    store = SqlStore(db)
    fast = build_fast_stores(settings, health.fast_stores_changed, tracing)
    services = build_services(
        settings,
        store,
        fast,
        settings.resolve_jwt_secret(),
        tracing.instrument_http_client if tracing is not None else None,
        health.add_component,
    )

    pipeline = build_pipeline(
        settings, services.auth, fast.limiter, fast.values, services.service_accounts, fast.prefetch
    )
    servicers = Servicers(
        AuthServicer(services.auth, services.service_accounts, services.accounts, client_of(settings)),
        ReferralServicer(services.referrals, services.rewards),
        EventServicer(services.events, services.webhooks),
    )
    server, port = build_grpc_server(settings, pipeline, servicers, health.servicer, tracing)
    probes = build_probes(settings, health, on_api_port=True, metrics_dir=metrics_dir)
    http = build_http_gateway(settings, pipeline, servicers, probes, tracing)
    metrics_server = build_metrics_server(settings, health, metrics_dir)
    return App(
        settings,
        db,
        store,
        fast,
        services,
        health,
        server,
        port,
        http,
        metrics_server,
        tracing,
        metrics_flusher=metrics.Flusher(metrics_dir),
    )


async def wait_for_database(settings: Settings) -> None:
    """Wait for the database (``REFERRAL_DATABASE_STARTUP_TIMEOUT_SECONDS``); StartupError with
    one line saying where and why when it does not answer."""
    db = Database(settings.effective_database_url, pool_size=1, timeout=settings.database.timeout_seconds)
    try:
        await db.wait_until_reachable(settings.database.startup_timeout_seconds)
    except DatabaseUnreachable as error:
        raise StartupError(str(error)) from None
    finally:
        await db.dispose()


async def migrate_database(settings: Settings) -> None:
    """Wait for the database, then apply the migrations (on PostgreSQL under an advisory lock:
    replicas starting together migrate one after the other). A failure is one line."""
    from referral_service.storage import migrate  # alembic only where it is needed
    from referral_service.storage.db import describe_error

    await wait_for_database(settings)
    try:
        await migrate.upgrade_async(settings.effective_database_url)
    except Exception as error:
        log.debug("migration failed", exc_info=True)
        raise StartupError(f"migrating the database failed: {describe_error(error)}") from None
