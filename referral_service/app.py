"""The composition root: the one place that turns Settings into a running service (engine,
cache, hasher, token codec, use cases, servicers, request pipeline and its two transports,
health, reflection)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from referral.v1 import auth_pb2, auth_pb2_grpc, referral_pb2, referral_pb2_grpc

from referral_service.api.auth import AuthServicer
from referral_service.api.health import GracefulHealthServicer
from referral_service.api.interceptors import ApiInterceptor
from referral_service.api.referral import ReferralServicer
from referral_service.cache import Cache, MemoryCache, RedisCache
from referral_service.config import EnrichmentProviderName, HunterPolicy, JwtAlgorithm, Settings
from referral_service.domain.auth import AuthService
from referral_service.domain.clock import utcnow
from referral_service.domain.enrichment import EnrichmentWorker, ProfileProvider
from referral_service.domain.passwords import Argon2Params, PasswordHasher
from referral_service.domain.ports import RateDecision
from referral_service.domain.referrals import ReferralService
from referral_service.domain.revocations import Revocations
from referral_service.domain.tokens import TokenCodec, TokenConfig, TokenKey, hmac_key, pem_key
from referral_service.domain.validation import DisposableDomains
from referral_service.domain.verification import EmailVerification, EmailVerifier
from referral_service.gateway import HttpGateway, bind
from referral_service.pipeline.address import ClientAddress
from referral_service.pipeline.auth import Authentication
from referral_service.pipeline.chain import Pipeline
from referral_service.pipeline.limits import RateLimits
from referral_service.ratelimit import RateLimiter, RedisRates
from referral_service.resilience import CircuitBreaker
from referral_service.storage import repositories as repo
from referral_service.storage.db import Database

log = logging.getLogger("referral_service")

SERVICES = (
    auth_pb2.DESCRIPTOR.services_by_name["AuthService"],
    referral_pb2.DESCRIPTOR.services_by_name["ReferralService"],
)
#: Health of the backing stores, reported under these service names.
HEALTH_REDIS = "referral-service.redis"
HEALTH_DATABASE = "referral-service.database"


class StartupError(RuntimeError):
    """The service cannot start as configured; the message says why."""


@dataclass
class App:
    settings: Settings
    db: Database
    cache: Cache
    hasher: PasswordHasher
    auth: AuthService
    referrals: ReferralService
    revocations: Revocations
    server: grpc.aio.Server
    health: GracefulHealthServicer
    port: int
    tokens: TokenCodec
    limiter: RateLimiter
    interceptor: ApiInterceptor
    #: Email verification provider; None when off.
    verifier: EmailVerifier | None = None
    #: Background profile enrichment; None when off.
    enrichment: EnrichmentWorker | None = None
    #: The HTTP/JSON gateway (None when REFERRAL_HTTP_ENABLED is false).
    http: HttpGateway | None = None
    _tasks: list[object] = field(default_factory=list)
    _db_up: bool = True
    _db_probe: asyncio.Task[None] | None = None
    _stopping: bool = False
    _housekeeper: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"{self.settings.grpc_host}:{self.port}"

    @property
    def http_port(self) -> int | None:
        """The bound HTTP port (useful with REFERRAL_HTTP_PORT=0)."""
        return self.http.port if self.http is not None else None

    async def _set_health(self, status: int) -> None:
        for name in ("", *(service.full_name for service in SERVICES), HEALTH_DATABASE):
            await self.health.set(name, status)

    def database_failed(self) -> None:
        """A call found the database unavailable: report NOT_SERVING (every service, so load
        balancers move traffic to replicas that can reach it) and probe until it is back."""
        if self._stopping or not self._db_up:
            return
        self._db_up = False
        log.warning("database unavailable: health NOT_SERVING until it answers again")
        self._db_probe = asyncio.get_running_loop().create_task(self._probe_database())

    async def _probe_database(self) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        delay = 0.2
        while not await self.db.ping():
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        self._db_up = True
        if not self._stopping:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            log.info("database reachable again: health SERVING")

    async def housekeeping(self) -> int:
        """Purge expired revocations, request ids and refresh tokens; returns rows deleted."""
        async with self.db.write() as session:
            return await repo.purge_expired(session, utcnow())

    async def _housekeeping_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.housekeeping_interval.total_seconds())
            try:
                deleted = await self.housekeeping()
            except Exception:
                log.warning("housekeeping failed; retrying at the next interval", exc_info=True)
            else:
                if deleted:
                    log.info("housekeeping purged %d expired rows", deleted)

    async def start(self) -> None:
        if self.cache.shared:
            await self.revocations.resync(utcnow())
        await self.server.start()
        self._housekeeper = asyncio.get_running_loop().create_task(self._housekeeping_loop())
        if self.enrichment is not None:
            # Picks up lookups left pending by an earlier run (shutdown, crash) at once.
            self.enrichment.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        redis_ok = await self.cache.healthy()
        await self.health.set(
            HEALTH_REDIS,
            health_pb2.HealthCheckResponse.SERVING
            if redis_ok
            else health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        if self.http is not None:
            await self.http.start()
            log.info(
                "serving HTTP/JSON on http://%s:%d (docs: /docs, OpenAPI: /openapi.json)",
                self.settings.http_host,
                self.http.port,
            )
        log.info(
            "serving gRPC on %s (database: %s, cache: %s)",
            self.address,
            self.db.dialect,
            self.cache.backend,
        )

    async def stop(self, grace: float | None = None, drain: float | None = None) -> None:
        """Report NOT_SERVING, keep serving for the drain period so that watchers notice, stop
        accepting calls and let in-flight ones finish within the grace period, then close the
        stores."""
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        drain = self.settings.shutdown_drain_seconds if drain is None else drain
        self._stopping = True
        if self._db_probe is not None:
            self._db_probe.cancel()
        if self._housekeeper is not None:
            self._housekeeper.cancel()
        await self.health.enter_graceful_shutdown()
        await asyncio.sleep(drain)
        # HTTP, then gRPC: each lets its in-flight calls finish, within one grace period.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self.http is not None:
            await self.http.stop(grace)
        remaining = max(deadline - loop.time(), 0.0)
        # Refuse new calls and let in-flight ones finish within the grace time (health watch
        # streams end by themselves, see api/health.py). Running enrichment lookups share the
        # same grace period; those still running at its end are handed back to the database.
        enrichment_stopping = (
            loop.create_task(self.enrichment.stop(remaining)) if self.enrichment is not None else None
        )
        await self.server.stop(remaining)
        if enrichment_stopping is not None and self.enrichment is not None:
            await enrichment_stopping
            await self.enrichment.provider.close()
        if self.verifier is not None:
            await self.verifier.close()
        await self.revocations.close()
        await self.cache.close()
        await self.db.dispose()
        self.hasher.close()
        log.info("stopped")


def build_cache(settings: Settings, on_health_change: Callable[[bool], None] | None = None) -> Cache:
    if settings.redis_url:
        return RedisCache(
            settings.redis_url,
            prefix=settings.redis_key_prefix,
            timeout=settings.redis_timeout_seconds,
            breaker_threshold=settings.redis_breaker_threshold,
            breaker_reset_seconds=settings.redis_breaker_reset_seconds,
            on_health_change=on_health_change,
        )
    if settings.shared_cache_needed:
        # Workers without Redis: no per-process value cache (it could serve a deleted code);
        # the store still short-cuts this process's own revocations.
        return MemoryCache(max_entries=0)
    return MemoryCache()


def build_verifier(settings: Settings) -> EmailVerifier | None:
    if settings.hunter_api_key is None:
        return None
    # The HTTP client (httpx, ~4 MB with what it imports) is loaded only when a provider is on.
    from referral_service.integrations import http
    from referral_service.integrations.hunter import HunterVerifier

    return HunterVerifier(
        http.client(
            connect_timeout=settings.hunter_connect_timeout_seconds,
            read_timeout=settings.hunter_read_timeout_seconds,
        ),
        base_url=settings.hunter_base_url,
        api_key=settings.hunter_api_key.get_secret_value(),
        total_timeout=settings.hunter_total_timeout_seconds,
        max_attempts=settings.hunter_max_attempts,
        retry_backoff=settings.hunter_retry_backoff_seconds,
        breaker=CircuitBreaker(
            settings.hunter_breaker_threshold,
            settings.hunter_breaker_reset_seconds,
            name="hunter",
            fallback=f"registrations skip email verification ({settings.hunter_policy.value})",
        ),
    )


def build_profile_provider(settings: Settings) -> ProfileProvider | None:
    if settings.enrichment_provider is EnrichmentProviderName.NONE:
        return None
    assert settings.enrichment_api_key is not None  # checked by Settings
    from referral_service.integrations import enrichment as enrichment_providers
    from referral_service.integrations import http

    kinds: dict[EnrichmentProviderName, tuple[type[enrichment_providers.ClearbitProvider], str]] = {
        EnrichmentProviderName.CLEARBIT: (
            enrichment_providers.ClearbitProvider,
            enrichment_providers.CLEARBIT_URL,
        ),
        EnrichmentProviderName.PEOPLEDATALABS: (
            enrichment_providers.PeopleDataLabsProvider,  # type: ignore[dict-item]
            enrichment_providers.PEOPLEDATALABS_URL,
        ),
    }
    kind, default_url = kinds[settings.enrichment_provider]
    return kind(
        http.client(
            connect_timeout=settings.enrichment_connect_timeout_seconds,
            read_timeout=settings.enrichment_read_timeout_seconds,
            max_connections=settings.enrichment_concurrency,
        ),
        base_url=settings.enrichment_base_url or default_url,
        api_key=settings.enrichment_api_key.get_secret_value(),
        breaker=CircuitBreaker(
            settings.enrichment_breaker_threshold,
            settings.enrichment_breaker_reset_seconds,
            name=settings.enrichment_provider.value,
            fallback="profile lookups wait",
        ),
    )


class LimiterPort:
    """The domain's ``RateLimiter`` port over ``ratelimit.RateLimiter`` (which answers with its
    own Decision type), until the limiter adapters implement the port themselves."""

    def __init__(self, limiter: RateLimiter) -> None:
        self._limiter = limiter

    async def acquire(self, key: str, limit: int, period: float) -> RateDecision:
        decision = await self._limiter.acquire(key, limit, period)
        return RateDecision(decision.allowed, decision.retry_after, decision.remaining)

    async def release(self, key: str, limit: int, period: float) -> None:
        await self._limiter.release(key, limit, period)


def build_rate_limits(settings: Settings, limiter: RateLimiter) -> RateLimits | None:
    """The limits the protos declare (``(referral.v1.rate_limit)``), at the configured rates."""
    if not settings.rate_limits_enabled:
        return None
    rates = {
        "login-account": settings.rate_limit_login_account,
        "login-address": settings.rate_limit_login_address,
        "register-address": settings.rate_limit_register_address,
        "code-check-address": settings.rate_limit_code_check_address,
        "lookup-address": settings.rate_limit_lookup_address,
    }
    address = ClientAddress(
        settings.rate_limit_trusted_proxies,
        settings.rate_limit_client_address_header,
        settings.rate_limit_ipv6_prefix,
    )
    try:
        return RateLimits.from_services(SERVICES, rates, LimiterPort(limiter), address)
    except RuntimeError as error:
        raise StartupError(str(error)) from None


def build_token_keys(settings: Settings, secret: bytes) -> tuple[TokenKey, list[TokenKey]]:
    """The signing key and the verification-only keys (rotation) from the settings."""
    previous = [
        hmac_key(old.get_secret_value().encode(), signing=False) for old in settings.jwt_previous_secrets
    ]
    previous += [pem_key(pem.encode(), signing=False) for pem in settings.jwt_previous_public_keys]
    if settings.jwt_algorithm is JwtAlgorithm.HS256:
        return hmac_key(secret), previous
    pem = settings.resolve_jwt_private_key()
    assert pem is not None
    signing = pem_key(pem)
    if signing.algorithm != settings.jwt_algorithm.value:
        raise ValueError(
            f"REFERRAL_JWT_ALGORITHM is {settings.jwt_algorithm.value} but the private key is for "
            f"{signing.algorithm}"
        )
    return signing, previous


async def build_app(settings: Settings) -> App:
    """Build the service and bind its port (not started yet)."""
    app_ref: list[App] = []

    def database_failed() -> None:
        if app_ref:
            app_ref[0].database_failed()

    db = Database(
        settings.effective_database_url,
        pool_size=settings.database_pool_size,
        timeout=settings.database_timeout_seconds,
        on_unavailable=database_failed,
    )
    health_servicer = GracefulHealthServicer()

    def redis_health(up: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        asyncio.get_running_loop().create_task(health_servicer.set(HEALTH_REDIS, status))

    cache = build_cache(settings, redis_health)
    secret = settings.resolve_jwt_secret()
    signing_key, verification_keys = build_token_keys(settings, secret)
    tokens = TokenCodec(
        TokenConfig(
            signing_key=signing_key,
            verification_keys=verification_keys,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            access_ttl=settings.access_token_ttl,
            refresh_ttl=settings.refresh_token_ttl,
            leeway_seconds=settings.jwt_leeway_seconds,
        )
    )
    hasher = PasswordHasher(
        Argon2Params(settings.argon2_time_cost, settings.argon2_memory_kib, settings.argon2_parallelism),
        workers=settings.hash_workers,
        queue=settings.hash_queue,
    )
    revocations = Revocations(db, cache)
    referrals = ReferralService(
        db,
        cache,
        page_secret=secret,
        max_horizon=settings.code_max_horizon,
        cache_ttl=settings.code_cache_ttl,
        negative_cache_ttl=settings.code_negative_cache_ttl,
        default_page_size=settings.list_default_page_size,
        max_page_size=settings.list_max_page_size,
        request_id_ttl=settings.request_id_ttl,
    )
    verifier = build_verifier(settings)
    verification = (
        EmailVerification(
            verifier,
            cache,
            fail_closed=settings.hunter_policy is HunterPolicy.FAIL_CLOSED,
            cache_ttl=settings.hunter_cache_ttl,
        )
        if verifier is not None
        else None
    )
    provider = build_profile_provider(settings)
    enrichment = (
        EnrichmentWorker(
            db,
            provider,
            max_attempts=settings.enrichment_max_attempts,
            retry_backoff=settings.enrichment_retry_backoff,
            retry_max=settings.enrichment_retry_max,
            concurrency=settings.enrichment_concurrency,
            poll_seconds=settings.enrichment_poll_seconds,
            lease=settings.enrichment_lease,
        )
        if provider is not None
        else None
    )
    auth = AuthService(
        db,
        hasher,
        tokens,
        revocations,
        request_id_ttl=settings.request_id_ttl,
        on_code_used=referrals.code_used,
        verification=verification,
        on_profile_queued=enrichment.notify if enrichment is not None else None,
        disposable_domains=(
            DisposableDomains(settings.disposable_domains_extra, settings.disposable_domains_allowed)
            if settings.reject_disposable_emails
            else None
        ),
    )
    limiter = RateLimiter(RedisRates(cache) if isinstance(cache, RedisCache) else None)
    pipeline = Pipeline(
        Authentication.from_services(SERVICES, auth.authenticate), build_rate_limits(settings, limiter)
    )
    interceptor = ApiInterceptor(pipeline)
    auth_servicer, referral_servicer = AuthServicer(auth), ReferralServicer(referrals)
    server = grpc.aio.server(
        interceptors=[interceptor],
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", 4 * 1024 * 1024),
            ("grpc.so_reuseport", 1 if settings.so_reuseport else 0),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ],
    )
    auth_pb2_grpc.add_AuthServiceServicer_to_server(auth_servicer, server)
    referral_pb2_grpc.add_ReferralServiceServicer_to_server(referral_servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [
            *(s.full_name for s in SERVICES),
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise StartupError(f"cannot listen on {address}: the address is in use or not available")
    http = None
    if settings.http_enabled:
        try:
            sock = bind(settings.http_host, settings.http_port, reuse_port=settings.so_reuseport)
        except OSError as error:
            where = f"{settings.http_host}:{settings.http_port}"
            raise StartupError(f"cannot listen on HTTP {where}: {error}") from None
        http = HttpGateway(
            sock,
            invokers=pipeline.handlers(
                {SERVICES[0]: auth_servicer, SERVICES[1]: referral_servicer},
                timeout=settings.http_timeout_seconds,
            ),
            health=lambda: health_pb2.HealthCheckResponse.ServingStatus.Name(health_servicer.status()),
            max_body_bytes=settings.http_max_body_bytes,
            cors_origins=settings.http_cors_origin_list,
            docs_enabled=settings.http_docs_enabled,
            client_address_header=pipeline.client_address_header,
        )
    app = App(
        settings=settings,
        db=db,
        cache=cache,
        hasher=hasher,
        auth=auth,
        referrals=referrals,
        revocations=revocations,
        server=server,
        health=health_servicer,
        port=port,
        tokens=tokens,
        limiter=limiter,
        interceptor=interceptor,
        verifier=verifier,
        enrichment=enrichment,
        http=http,
    )
    app_ref.append(app)
    return app
