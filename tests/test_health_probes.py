"""Health that tells the truth, with a real ``serve`` process and nobody calling the API: cut the
database (or Redis) behind a loopback proxy and watch the health service turn NOT_SERVING by
itself, then SERVING again when it comes back; /readyz says which component, /livez stays up."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import make_url

from tests.conftest import REDIS_URL, TEST_SECRET, _need, truncate_postgres
from tests.live import LiveServer
from tests.proxy import Proxy

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
#: Upper bound on waiting for one health change (the probe runs every 0.2 s here).
WAIT = 30.0


class Watcher:
    """A gRPC health Watch stream: ``next_status()`` is the next status the server sends."""

    def __init__(self, channel: grpc.aio.Channel, service: str) -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        self._stream = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=300)

    async def next_status(self) -> int:
        response = await self._stream.read()
        assert response is not grpc.aio.EOF
        return int(response.status)

    async def until(self, status: int) -> None:
        async with asyncio.timeout(WAIT):
            while await self.next_status() != status:
                pass

    def cancel(self) -> None:
        self._stream.cancel()


@pytest.fixture
async def proxied_server(
    tmp_path: Path, postgres_database: str | None, redis_available: bool
) -> AsyncIterator[tuple[LiveServer, Proxy, Proxy]]:
    _need("PostgreSQL", postgres_database is not None)
    _need("Redis", redis_available)
    assert postgres_database is not None
    await truncate_postgres(postgres_database)
    url = make_url(postgres_database)
    database = await Proxy(url.host or "127.0.0.1", url.port or 5432).start()
    redis_url = make_url(REDIS_URL.replace("redis://", "postgresql://"))  # host and port only
    redis = await Proxy(redis_url.host or "127.0.0.1", redis_url.port or 6379).start()
    env = {
        "REFERRAL_DATABASE_URL": database.database_url(postgres_database),
        "REFERRAL_DATABASE_TIMEOUT_SECONDS": "1",
        "REFERRAL_REDIS_URL": redis.url,
        "REFERRAL_REDIS_KEY_PREFIX": f"health:{os.getpid()}:{tmp_path.name}:",
        "REFERRAL_REDIS_BREAKER_RESET_SECONDS": "0.5",
        "REFERRAL_JWT_SECRET": TEST_SECRET,
        "REFERRAL_HEALTH_PROBE_INTERVAL_SECONDS": "0.2",
        "REFERRAL_WORKERS": "1",
        "REFERRAL_SHUTDOWN_DRAIN_SECONDS": "0",
    }
    server = LiveServer(tmp_path, env=env).start()
    try:
        yield server, database, redis
    finally:
        database.restore()
        redis.restore()
        output = server.stop()
        await database.close()
        await redis.close()
    assert server.returncode == 0, output


@pytest.mark.parametrize("failure", ["refuse", "hang"])
async def test_a_database_outage_turns_health_not_serving_without_any_call_and_back(
    proxied_server: tuple[LiveServer, Proxy, Proxy], failure: str
) -> None:
    server, database, _ = proxied_server
    async with (
        grpc.aio.insecure_channel(server.target) as channel,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}") as http,
    ):
        overall, component = Watcher(channel, ""), Watcher(channel, "referral-service.database")
        await overall.until(SERVING)  # after SERVICE_UNKNOWN while start-up checks run
        await component.until(SERVING)  # after SERVICE_UNKNOWN while start-up checks run

        getattr(database, failure)()
        await overall.until(NOT_SERVING)
        await component.until(NOT_SERVING)
        ready = await http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["components"]["database"] == "NOT_SERVING"
        assert (await http.get("/healthz")).status_code == 503
        assert (await http.get("/livez")).status_code == 200  # alive: no reason to restart it
        scrape = (await http.get("/metrics")).text
        assert 'referral_health_serving{component="database"} 0.0' in scrape

        database.restore()
        await overall.until(SERVING)
        await component.until(SERVING)
        assert (await http.get("/readyz")).json() == {
            "status": "SERVING",
            "components": {"database": "SERVING", "redis": "SERVING"},
        }
        overall.cancel()
        component.cancel()
    output = server.stop()
    assert "database unreachable" in output
    assert "database reachable again: health SERVING" in output


async def test_a_redis_outage_is_its_own_health_entry_and_the_service_keeps_serving(
    proxied_server: tuple[LiveServer, Proxy, Proxy],
) -> None:
    server, _, redis = proxied_server
    async with grpc.aio.insecure_channel(server.target) as channel:
        cache = Watcher(channel, "referral-service.redis")
        await cache.until(SERVING)  # after SERVICE_UNKNOWN while start-up checks run
        redis.refuse()
        await cache.until(NOT_SERVING)
        overall = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert overall.status == SERVING  # Redis is an accelerator: degraded, still serving
        redis.restore()
        await cache.until(SERVING)
        cache.cancel()


async def test_the_health_command_answers_for_the_local_server(
    proxied_server: tuple[LiveServer, Proxy, Proxy],
) -> None:
    """What the container's HEALTHCHECK runs: exit 0 while SERVING, 1 while the database is away."""
    import subprocess
    import sys

    server, database, _ = proxied_server
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFERRAL_")}
    env["REFERRAL_HTTP_PORT"] = str(server.http_port)

    def health() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "referral_service", "health"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    ok = await asyncio.to_thread(health)
    assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING")
    async with grpc.aio.insecure_channel(server.target) as channel:
        watcher = Watcher(channel, "")
        await watcher.until(SERVING)  # after SERVICE_UNKNOWN while start-up checks run
        database.refuse()
        await watcher.until(NOT_SERVING)
        watcher.cancel()
    down = await asyncio.to_thread(health)
    assert (down.returncode, down.stdout.strip()) == (1, "NOT_SERVING")
    database.restore()
    env["REFERRAL_HTTP_PORT"] = "9"  # nothing there
    gone = await asyncio.to_thread(health)
    assert gone.returncode == 1
    assert gone.stdout.startswith("UNREACHABLE")
