"""The composition root: the one place that turns Settings into a running service (engine,
cache, hasher, token codec, use cases, servicers, interceptor, health, reflection)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from referral.v1 import auth_pb2, auth_pb2_grpc, referral_pb2, referral_pb2_grpc

from referral_service.api.auth import AuthServicer
from referral_service.api.interceptors import ApiInterceptor, access_rules
from referral_service.api.ratelimits import ClientAddress, RateLimits, rules_from_settings
from referral_service.api.referral import ReferralServicer
from referral_service.cache import Cache, MemoryCache, RedisCache
from referral_service.config import JwtAlgorithm, Settings
from referral_service.domain.auth import AuthService
from referral_service.domain.clock import utcnow
from referral_service.domain.passwords import Argon2Params, PasswordHasher
from referral_service.domain.referrals import ReferralService
from referral_service.domain.revocations import Revocations
from referral_service.domain.tokens import TokenCodec, TokenConfig, TokenKey, hmac_key, pem_key
from referral_service.domain.validation import DisposableDomains
from referral_service.ratelimit import RateLimiter, RedisRates
from referral_service.storage.db import Database

log = logging.getLogger("referral_service")

SERVICES = (
    auth_pb2.DESCRIPTOR.services_by_name["AuthService"],
    referral_pb2.DESCRIPTOR.services_by_name["ReferralService"],
)
#: Health of the backing stores, reported under these service names.
HEALTH_REDIS = "referral-service.redis"
HEALTH_DATABASE = "referral-service.database"


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
    health: HealthServicer
    port: int
    tokens: TokenCodec
    limiter: RateLimiter
    interceptor: ApiInterceptor
    _tasks: list[object] = field(default_factory=list)
    _db_up: bool = True
    _db_probe: asyncio.Task[None] | None = None
    _stopping: bool = False

    @property
    def address(self) -> str:
        return f"{self.settings.grpc_host}:{self.port}"

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

    async def start(self) -> None:
        if self.cache.shared:
            await self.revocations.resync(utcnow())
        await self.server.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        redis_ok = await self.cache.healthy()
        await self.health.set(
            HEALTH_REDIS,
            health_pb2.HealthCheckResponse.SERVING
            if redis_ok
            else health_pb2.HealthCheckResponse.NOT_SERVING,
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
        await self.health.enter_graceful_shutdown()
        await asyncio.sleep(drain)
        # Refuse new calls, wait (up to the grace time) for the calls of our services, then end
        # what is left: long-lived streams such as health watches would otherwise hold the
        # process for the whole grace time.
        stopping = asyncio.get_running_loop().create_task(self.server.stop(grace))
        await asyncio.sleep(0.05)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                while True:
                    await self.interceptor.in_flight.idle()
                    await asyncio.sleep(0.05)  # a call accepted just before the stop
                    if self.interceptor.in_flight.count == 0:
                        break
        await self.server.stop(0)
        await stopping
        await self.revocations.close()
        await self.cache.close()
        await self.db.dispose()
        self.hasher.close()
        log.info("stopped")


def build_cache(settings: Settings, on_health_change: object = None) -> Cache:
    if settings.redis_url:
        return RedisCache(
            settings.redis_url,
            prefix=settings.redis_key_prefix,
            timeout=settings.redis_timeout_seconds,
            breaker_threshold=settings.redis_breaker_threshold,
            breaker_reset_seconds=settings.redis_breaker_reset_seconds,
            on_health_change=on_health_change,  # type: ignore[arg-type]
        )
    return MemoryCache()


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
    health_servicer = HealthServicer()

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
    auth = AuthService(
        db,
        hasher,
        tokens,
        revocations,
        request_id_ttl=settings.request_id_ttl,
        on_code_used=referrals.code_used,
        disposable_domains=(
            DisposableDomains(settings.disposable_domains_extra, settings.disposable_domains_allowed)
            if settings.reject_disposable_emails
            else None
        ),
    )
    limiter = RateLimiter(RedisRates(cache) if isinstance(cache, RedisCache) else None)
    limits = RateLimits(
        limiter,
        rules_from_settings(settings),
        ClientAddress(
            settings.rate_limit_trusted_proxies,
            settings.rate_limit_client_address_header,
            settings.rate_limit_ipv6_prefix,
        ),
    )
    interceptor = ApiInterceptor(access_rules(SERVICES), auth.authenticate, limits)
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
    port = server.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")
    if port == 0:
        raise RuntimeError(f"could not bind {settings.grpc_host}:{settings.grpc_port}")
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
    )
    app_ref.append(app)
    return app
