"""The composition root: the one place that turns Settings into a running service (engine,
cache, hasher, token codec, use cases, servicers, interceptor, health, reflection)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from referral.v1 import auth_pb2, auth_pb2_grpc, referral_pb2, referral_pb2_grpc

from referral_service.api.auth import AuthServicer
from referral_service.api.interceptors import ApiInterceptor, access_rules
from referral_service.api.referral import ReferralServicer
from referral_service.cache import Cache, MemoryCache, RedisCache
from referral_service.config import Settings
from referral_service.domain.auth import AuthService
from referral_service.domain.clock import utcnow
from referral_service.domain.passwords import Argon2Params, PasswordHasher
from referral_service.domain.referrals import ReferralService
from referral_service.domain.revocations import Revocations
from referral_service.domain.tokens import TokenCodec, TokenConfig
from referral_service.gateway import HttpGateway, bind, loopback_target
from referral_service.storage.db import Database

log = logging.getLogger("referral_service")

SERVICES = (
    auth_pb2.DESCRIPTOR.services_by_name["AuthService"],
    referral_pb2.DESCRIPTOR.services_by_name["ReferralService"],
)
#: Health of the backing stores, reported under these service names.
HEALTH_REDIS = "referral-service.redis"


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
    #: The HTTP/JSON gateway (None when REFERRAL_HTTP_ENABLED is false).
    http: HttpGateway | None = None
    _tasks: list[object] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.settings.grpc_host}:{self.port}"

    @property
    def http_port(self) -> int | None:
        """The bound HTTP port (useful with REFERRAL_HTTP_PORT=0)."""
        return self.http.port if self.http is not None else None

    async def _set_health(self, status: int) -> None:
        for name in ("", *(service.full_name for service in SERVICES)):
            await self.health.set(name, status)

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
        await self.health.enter_graceful_shutdown()
        await asyncio.sleep(drain)
        # HTTP first: its in-flight requests still need the gRPC server to answer them.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self.http is not None:
            await self.http.stop(grace)
        await self.server.stop(max(deadline - loop.time(), 0.0))
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


async def build_app(settings: Settings) -> App:
    """Build the service and bind its port (not started yet)."""
    db = Database(
        settings.effective_database_url,
        pool_size=settings.database_pool_size,
        timeout=settings.database_timeout_seconds,
    )
    health_servicer = HealthServicer()

    def redis_health(up: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        asyncio.get_running_loop().create_task(health_servicer.set(HEALTH_REDIS, status))

    cache = build_cache(settings, redis_health)
    secret = settings.resolve_jwt_secret()
    tokens = TokenCodec(
        TokenConfig(
            secret=secret,
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
    )
    server = grpc.aio.server(
        interceptors=[ApiInterceptor(access_rules(SERVICES), auth.authenticate)],
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
    http = None
    if settings.http_enabled:
        try:
            sock = bind(settings.http_host, settings.http_port, reuse_port=settings.so_reuseport)
        except OSError as error:
            where = f"{settings.http_host}:{settings.http_port}"
            raise RuntimeError(f"could not bind HTTP {where}: {error}") from None
        http = HttpGateway(
            sock,
            grpc_target=loopback_target(settings.grpc_host, port),
            max_body_bytes=settings.http_max_body_bytes,
            timeout_seconds=settings.http_timeout_seconds,
            cors_origins=settings.http_cors_origin_list,
            docs_enabled=settings.http_docs_enabled,
        )
    return App(
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
        http=http,
    )
