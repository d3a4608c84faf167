"""The composition root: the one place that turns Settings into a running service (engine,
fast stores, hasher, token codec, use cases, servicers, interceptor, health, reflection)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from referral.v1 import auth_pb2, auth_pb2_grpc, referral_pb2, referral_pb2_grpc

from referral_service.api.auth import AuthServicer
from referral_service.api.health import GracefulHealthServicer
from referral_service.api.interceptors import (
    ApiInterceptor,
    access_rules,
    gateway_auth_key,
    read_only_methods,
)
from referral_service.api.ratelimits import ClientAddress, RateLimits, rules_from_settings
from referral_service.api.referral import ReferralServicer
from referral_service.config import EnrichmentProviderName, HunterPolicy, JwtAlgorithm, Settings
from referral_service.crypto.jwt import JwtCodec, TokenConfig, TokenKey, hmac_key, pem_key
from referral_service.crypto.passwords import Argon2Params, Argon2PasswordHasher
from referral_service.domain.auth import AuthService
from referral_service.domain.backoff import backoff_delay
from referral_service.domain.clock import utcnow
from referral_service.domain.enrichment import EnrichmentWorker, ProfileProvider
from referral_service.domain.ports import KeyValueCache, RateLimiter, RevocationCache, VersionedCache
from referral_service.domain.referrals import ReferralService
from referral_service.domain.revocations import Revocations
from referral_service.domain.validation import DisposableDomains
from referral_service.domain.verification import EmailVerification, EmailVerifier
from referral_service.gateway import HttpGateway, bind, loopback_target
from referral_service.memory.cache import MemoryCache, NoCache
from referral_service.memory.limiter import MemoryRateLimiter
from referral_service.memory.revocations import MemoryRevocations
from referral_service.resilience import CircuitBreaker
from referral_service.storage.db import Database
from referral_service.storage.store import SqlStore

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


@dataclass
class App:
    settings: Settings
    db: Database
    store: SqlStore
    stores: FastStores
    hasher: Argon2PasswordHasher
    auth: AuthService
    referrals: ReferralService
    revocations: Revocations
    server: grpc.aio.Server
    health: GracefulHealthServicer
    port: int
    tokens: JwtCodec
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
        return f"{self.settings.server.grpc_host}:{self.port}"

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
        attempt = 0
        while not await self.store.ping():
            attempt += 1
            await asyncio.sleep(backoff_delay(attempt, 0.2, 2.0))
        self._db_up = True
        if not self._stopping:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            log.info("database reachable again: health SERVING")

    async def housekeeping(self) -> int:
        """Purge expired revocations, request ids and refresh tokens; returns rows deleted."""
        now = utcnow()
        return await self.store.transact(lambda uow: uow.purge_expired(now))

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

    async def start(self) -> None:
        if self.stores.revocations.shared:
            await self.revocations.resync()
        await self.server.start()
        self._housekeeper = asyncio.get_running_loop().create_task(self._housekeeping_loop())
        if self.enrichment is not None:
            # Picks up lookups left pending by an earlier run (shutdown, crash) at once.
            self.enrichment.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        redis_ok = await self.stores.ping()
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
                self.settings.http.host,
                self.http.port,
            )
        log.info(
            "serving gRPC on %s (database: %s, cache: %s)",
            self.address,
            self.db.dialect,
            self.stores.backend,
        )

    async def stop(self, grace: float | None = None, drain: float | None = None) -> None:
        """Report NOT_SERVING, keep serving for the drain period so that watchers notice, stop
        accepting calls and let in-flight ones finish within the grace period, then close the
        stores."""
        grace = self.settings.server.shutdown_grace_seconds if grace is None else grace
        drain = self.settings.server.shutdown_drain_seconds if drain is None else drain
        self._stopping = True
        if self._db_probe is not None:
            self._db_probe.cancel()
        if self._housekeeper is not None:
            self._housekeeper.cancel()
        await self.health.enter_graceful_shutdown()
        await asyncio.sleep(drain)
        # HTTP first: its in-flight requests still need the gRPC server to answer them.
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
        await self.stores.close()
        await self.db.dispose()
        self.hasher.close()
        log.info("stopped")


def build_fast_stores(
    settings: Settings, on_health_change: Callable[[bool], None] | None = None
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
        )
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


def build_verifier(settings: Settings) -> EmailVerifier | None:
    if settings.hunter.api_key is None:
        return None
    # The HTTP client (httpx, ~4 MB with what it imports) is loaded only when a provider is on.
    from referral_service.integrations import http
    from referral_service.integrations.hunter import HunterVerifier

    return HunterVerifier(
        http.client(
            connect_timeout=settings.hunter.connect_timeout_seconds,
            read_timeout=settings.hunter.read_timeout_seconds,
        ),
        base_url=settings.hunter.base_url,
        api_key=settings.hunter.api_key.get_secret_value(),
        total_timeout=settings.hunter.total_timeout_seconds,
        max_attempts=settings.hunter.max_attempts,
        retry_backoff=settings.hunter.retry_backoff_seconds,
        breaker=CircuitBreaker(
            settings.hunter.breaker_threshold,
            settings.hunter.breaker_reset_seconds,
            name="hunter",
            fallback=f"registrations skip email verification ({settings.hunter.policy.value})",
        ),
    )


def build_profile_provider(settings: Settings) -> ProfileProvider | None:
    if settings.enrichment.provider is EnrichmentProviderName.NONE:
        return None
    assert settings.enrichment.api_key is not None  # checked by Settings
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
    kind, default_url = kinds[settings.enrichment.provider]
    return kind(
        http.client(
            connect_timeout=settings.enrichment.connect_timeout_seconds,
            read_timeout=settings.enrichment.read_timeout_seconds,
            max_connections=settings.enrichment.concurrency,
        ),
        base_url=settings.enrichment.base_url or default_url,
        api_key=settings.enrichment.api_key.get_secret_value(),
        breaker=CircuitBreaker(
            settings.enrichment.breaker_threshold,
            settings.enrichment.breaker_reset_seconds,
            name=settings.enrichment.provider.value,
            fallback="profile lookups wait",
        ),
    )


def build_token_keys(settings: Settings, secret: bytes) -> tuple[TokenKey, list[TokenKey]]:
    """The signing key and the verification-only keys (rotation) from the settings."""
    previous = [
        hmac_key(old.get_secret_value().encode(), signing=False) for old in settings.jwt.previous_secrets
    ]
    previous += [pem_key(pem.encode(), signing=False) for pem in settings.jwt.previous_public_keys]
    if settings.jwt.algorithm is JwtAlgorithm.HS256:
        return hmac_key(secret), previous
    pem = settings.resolve_jwt_private_key()
    assert pem is not None
    signing = pem_key(pem)
    if signing.algorithm != settings.jwt.algorithm.value:
        raise ValueError(
            f"REFERRAL_JWT_ALGORITHM is {settings.jwt.algorithm.value} but the private key is for "
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
        pool_size=settings.database.pool_size,
        timeout=settings.database.timeout_seconds,
        on_unavailable=database_failed,
    )
    health_servicer = GracefulHealthServicer()

    def redis_health(up: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        asyncio.get_running_loop().create_task(health_servicer.set(HEALTH_REDIS, status))

    stores = build_fast_stores(settings, redis_health)
    secret = settings.resolve_jwt_secret()
    signing_key, verification_keys = build_token_keys(settings, secret)
    tokens = JwtCodec(
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
    hasher = Argon2PasswordHasher(
        Argon2Params(
            settings.passwords.argon2_time_cost,
            settings.passwords.argon2_memory_kib,
            settings.passwords.argon2_parallelism,
        ),
        workers=settings.passwords.hash_workers,
        queue=settings.passwords.hash_queue,
    )
    store = SqlStore(db)
    revocations = Revocations(store, stores.revocations)
    referrals = ReferralService(
        store,
        stores.cache,
        page_secret=secret,
        max_horizon=settings.codes.max_horizon,
        cache_ttl=settings.codes.cache_ttl,
        negative_cache_ttl=settings.codes.negative_cache_ttl,
        default_page_size=settings.codes.list_default_page_size,
        max_page_size=settings.codes.list_max_page_size,
        request_id_ttl=settings.server.request_id_ttl,
    )
    verifier = build_verifier(settings)
    verification = (
        EmailVerification(
            verifier,
            stores.values,
            fail_closed=settings.hunter.policy is HunterPolicy.FAIL_CLOSED,
            cache_ttl=settings.hunter.cache_ttl,
        )
        if verifier is not None
        else None
    )
    provider = build_profile_provider(settings)
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
    auth = AuthService(
        store,
        hasher,
        tokens,
        revocations,
        request_id_ttl=settings.server.request_id_ttl,
        on_code_used=referrals.code_used,
        verification=verification,
        on_profile_queued=enrichment.notify if enrichment is not None else None,
        disposable_domains=(
            DisposableDomains(
                settings.registration.disposable_domains_extra,
                settings.registration.disposable_domains_allowed,
            )
            if settings.registration.reject_disposable_emails
            else None
        ),
    )
    limits = RateLimits(
        stores.limiter,
        rules_from_settings(settings),
        ClientAddress(
            settings.rate_limits.trusted_proxies,
            settings.rate_limits.client_address_header,
            settings.rate_limits.ipv6_prefix,
        ),
    )
    gateway_auth = gateway_auth_key(secret)
    interceptor = ApiInterceptor(
        access_rules(SERVICES),
        auth.authenticate,
        limits,
        gateway_auth,
        # SQLite: a cancelled call finishes its transaction first (see the interceptor);
        # PostgreSQL rolls an interrupted transaction back itself when the connection drops.
        finish_when_cancelled=db.dialect == "sqlite",
        read_only=read_only_methods(SERVICES),
    )
    server = grpc.aio.server(
        interceptors=[interceptor],
        options=[
            ("grpc.max_receive_message_length", settings.server.max_message_bytes),
            ("grpc.max_send_message_length", 4 * 1024 * 1024),
            ("grpc.so_reuseport", 1 if settings.server.so_reuseport else 0),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ],
    )
    auth_pb2_grpc.add_AuthServiceServicer_to_server(AuthServicer(auth), server)
    referral_pb2_grpc.add_ReferralServiceServicer_to_server(ReferralServicer(referrals), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [
            *(s.full_name for s in SERVICES),
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    address = f"{settings.server.grpc_host}:{settings.server.grpc_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise StartupError(f"cannot listen on {address}: the address is in use or not available")
    http = None
    if settings.http.enabled:
        try:
            sock = bind(settings.http.host, settings.http.port, reuse_port=settings.server.so_reuseport)
        except OSError as error:
            where = f"{settings.http.host}:{settings.http.port}"
            raise StartupError(f"cannot listen on HTTP {where}: {error}") from None
        http = HttpGateway(
            sock,
            grpc_target=loopback_target(settings.server.grpc_host, port),
            max_body_bytes=settings.http.max_body_bytes,
            timeout_seconds=settings.http.timeout_seconds,
            cors_origins=settings.http.cors_origin_list,
            docs_enabled=settings.http.docs_enabled,
            gateway_auth=gateway_auth,
            client_address_header=settings.rate_limits.client_address_header,
        )
    app = App(
        settings=settings,
        db=db,
        store=store,
        stores=stores,
        hasher=hasher,
        auth=auth,
        referrals=referrals,
        revocations=revocations,
        server=server,
        health=health_servicer,
        port=port,
        tokens=tokens,
        limiter=stores.limiter,
        interceptor=interceptor,
        verifier=verifier,
        enrichment=enrichment,
        http=http,
    )
    app_ref.append(app)
    return app
