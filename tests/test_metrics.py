"""Prometheus metrics: scraped over HTTP as Prometheus would, from a real two-worker server
(calls that landed on either worker all counted, whichever worker answers the scrape) and from
the in-process server (each family moves when what it counts happens)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import duration_pb2
from prometheus_client.parser import text_string_to_metric_families
from referral.v1 import referral_pb2, referral_pb2_grpc

from tests.conftest import Api, Stack, start_api, stop_api
from tests.errors import expect_error
from tests.fake_http import FakeHttp
from tests.live import LiveServer
from tests.vendors import Hunter

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample ``name`` whose labels include ``labels`` (summed when several match)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


LOOKUP = {"grpc_service": "referral.v1.ReferralService", "grpc_method": "GetReferralCodeByEmail"}


async def test_a_two_worker_server_counts_the_calls_of_both_workers_in_every_scrape(tmp_path: Path) -> None:
    server = LiveServer(tmp_path, "--migrate", "--workers", "2").start()
    try:
        await asyncio.to_thread(server.wait_for_log, "with 2 workers")  # both serve
        # One connection per call: SO_REUSEPORT spreads connections over the workers.
        for n in range(16):
            async with grpc.aio.insecure_channel(server.target) as channel:
                stub = referral_pb2_grpc.ReferralServiceStub(channel)
                await expect_error(
                    stub.GetReferralCodeByEmail(
                        referral_pb2.GetReferralCodeByEmailRequest(email=f"nobody{n}@example.com"),
                        metadata=(("x-request-id", f"metrics-grpc-{n}"),),
                        timeout=5,
                    ),
                    grpc.StatusCode.NOT_FOUND,
                )
        base = f"http://127.0.0.1:{server.http_port}"
        for n in range(8):
            async with httpx.AsyncClient(base_url=base) as http:
                response = await http.get(
                    f"/v1/referral-codes/by-email/nobody{n}@example.com",
                    headers={"x-request-id": f"metrics-http-{n}"},
                )
                assert response.status_code == 404
        for _ in range(6):  # new connections: the scrapes land on either worker
            async with httpx.AsyncClient(base_url=base) as http:
                scrape = await http.get("/metrics")
            assert scrape.status_code == 200
            assert scrape.headers["content-type"].startswith("text/plain; version=")
            samples = parse(scrape.text)
            handled = "grpc_server_handled_total"
            assert value(samples, handled, **LOOKUP, transport="grpc", grpc_code="NotFound") == 16
            assert value(samples, handled, **LOOKUP, transport="http", grpc_code="NotFound") == 8
            assert value(samples, "grpc_server_started_total", **LOOKUP, transport="grpc") == 16
            assert value(samples, "grpc_server_handling_seconds_count", **LOOKUP) == 24
            assert (
                value(
                    samples,
                    "http_server_request_duration_seconds_count",
                    http_route="/v1/referral-codes/by-email/{email}",
                    http_response_status_code="404",
                    http_request_method="GET",
                )
                == 8
            )
            assert value(samples, "referral_cache_lookups_total", cache="referral_code_by_email") == 24
            assert value(samples, "referral_build_info") == 1  # max over the live workers
            assert value(samples, "referral_health_serving", component="database") == 1
            assert value(samples, "referral_db_pool_max_connections", pool="main") == 2 * 10
    finally:
        output = server.stop()
    assert server.returncode == 0, output
    workers_of_calls = {
        match.group(1)
        for line in output.splitlines()
        if "request_id=metrics-" in line and (match := re.search(r"worker=(\d)", line))
    }
    assert workers_of_calls == {"0", "1"}, "the calls did not reach both workers"
    # health probes and scrapes are logged at DEBUG: no access line at INFO
    assert "GET /metrics" not in output


@pytest.fixture
async def http(api: Api) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.app.http_port}") as client:
        yield client


async def scrape(http: httpx.AsyncClient) -> Samples:
    response = await http.get("/metrics")
    assert response.status_code == 200
    return parse(response.text)


@pytest.mark.one_stack
async def test_every_method_is_exported_before_its_first_call(api: Api, http: httpx.AsyncClient) -> None:
    samples = await scrape(http)
    for method in ("Register", "Login", "GetReferralCodeByEmail", "ListReferrals"):
        for transport in ("grpc", "http"):
            assert ("grpc_server_started_total", frozenset()) not in samples
            assert any(
                name == "grpc_server_started_total"
                and ("grpc_method", method) in labels
                and ("transport", transport) in labels
                for name, labels in samples
            ), (method, transport)
    families = {family.name for family in text_string_to_metric_families((await http.get("/metrics")).text)}
    for expected in (
        "grpc_server_started",
        "grpc_server_handled",
        "grpc_server_handling_seconds",
        "http_server_request_duration_seconds",
        "http_server_active_requests",
        "referral_rate_limit_rejections",
        "referral_password_hash_queue_depth",
        "referral_password_hash_wait_seconds",
        "referral_db_pool_checked_out_connections",
        "referral_db_pool_max_connections",
        "referral_circuit_breaker_open",
        "referral_health_serving",
        "referral_build_info",
        "process_cpu_seconds",  # one worker: the process collector too
    ):
        assert expected in families, expected


@pytest.mark.all_stacks
async def test_cache_hits_and_misses_are_counted(api: Api, http: httpx.AsyncClient) -> None:
    email = api.unique_email()
    _, token = await api.user_with_token(email)
    ttl = duration_pb2.Duration(seconds=3600)
    await api.referral.CreateReferralCode(
        referral_pb2.CreateReferralCodeRequest(ttl=ttl), metadata=(("authorization", f"Bearer {token}"),)
    )
    before = await scrape(http)
    for _ in range(3):
        await api.referral.GetReferralCodeByEmail(referral_pb2.GetReferralCodeByEmailRequest(email=email))
    after = await scrape(http)

    def delta(result: str) -> float:
        labels = {"cache": "referral_code_by_email", "result": result}
        return value(after, "referral_cache_lookups_total", **labels) - value(
            before, "referral_cache_lookups_total", **labels
        )

    assert (delta("miss"), delta("hit")) == (1, 2)


@pytest.mark.one_stack
async def test_rate_limit_rejections_are_counted_by_limit(stack: Stack) -> None:
    api = await start_api(stack, rate_limit_lookup_address="2/1h")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.app.http_port}") as http:
            before = await scrape(http)
            request = referral_pb2.GetReferralCodeByEmailRequest(email="nobody@example.com")
            for _ in range(2):
                await expect_error(api.referral.GetReferralCodeByEmail(request), grpc.StatusCode.NOT_FOUND)
            for _ in range(3):
                await expect_error(
                    api.referral.GetReferralCodeByEmail(request),
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "RATE_LIMITED",
                )
            after = await scrape(http)
    finally:
        await stop_api(api)
    name = "referral_rate_limit_rejections_total"
    assert value(after, name, limit="lookup-address") - value(before, name, limit="lookup-address") == 3
    handled = "grpc_server_handled_total"
    assert (
        value(after, handled, **LOOKUP, grpc_code="ResourceExhausted")
        - value(before, handled, **LOOKUP, grpc_code="ResourceExhausted")
        == 3
    )


@pytest.mark.one_stack
async def test_password_hashing_pool_and_database_pool(api: Api, http: httpx.AsyncClient) -> None:
    before = await scrape(http)
    emails = [api.unique_email() for _ in range(4)]
    await asyncio.gather(*(api.register(email) for email in emails))
    # The mail worker sends their verification messages in the background: once they are
    # out, its connections are back in the pools too.
    from tests.mail import wait_for

    for email in emails:
        await wait_for(api.mailbox, email, "verify_email")
    for _ in range(200):
        after = await scrape(http)
        if value(after, "referral_db_pool_checked_out_connections") == value(
            before, "referral_db_pool_checked_out_connections"
        ):
            break
        await asyncio.sleep(0.05)
    for name in (
        "referral_password_hash_wait_seconds_count",
        "referral_password_hash_duration_seconds_count",
    ):
        assert value(after, name) - value(before, name) >= 4, name
    assert value(after, "referral_password_hash_queue_depth") == value(
        before, "referral_password_hash_queue_depth"
    )
    # every connection went back to the pools; a scrape shows their size
    assert value(after, "referral_db_pool_checked_out_connections") == value(
        before, "referral_db_pool_checked_out_connections"
    )
    assert value(after, "referral_db_pool_max_connections", pool="main") >= 10


@pytest.mark.one_stack
async def test_provider_calls_are_counted_by_outcome(stack: Stack) -> None:
    hunter = await FakeHttp(Hunter()).start()
    api = await start_api(
        stack,
        hunter_api_key="k" * 20,
        hunter_base_url=f"{hunter.url}/v2",
        hunter_retry_backoff_seconds=0.01,
        hunter_breaker_threshold=1000,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.app.http_port}") as http:
            before = await scrape(http)
            await api.register("valid-metrics@example.com")
            await api.register("s500-metrics@example.com")
            after = await scrape(http)
    finally:
        await stop_api(api)
        await hunter.close()
    name = "referral_provider_request_duration_seconds_count"
    for outcome in ("success", "server_error"):
        assert (
            value(after, name, provider="hunter", outcome=outcome)
            - value(before, name, provider="hunter", outcome=outcome)
            == 1
        ), outcome
    assert "valid-metrics" not in (await asyncio.to_thread(lambda: str(after)))  # no email in a label


@pytest.mark.one_stack
async def test_a_metrics_port_serves_metrics_and_probes_and_the_api_port_no_longer_metrics(
    stack: Stack,
) -> None:
    api = await start_api(stack, metrics_port=0)
    try:
        assert api.app.metrics_server is not None
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.app.metrics_server.port}") as admin,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.app.http_port}") as public,
        ):
            assert "grpc_server_started_total" in (await admin.get("/metrics")).text
            assert (await admin.get("/healthz")).json() == {"status": "SERVING"}
            ready = (await admin.get("/readyz")).json()
            assert ready["status"] == "SERVING"
            assert ready["components"]["database"] == "SERVING"
            assert (await admin.get("/livez")).status_code == 200
            missing = await admin.get("/v1/users/me")
            assert missing.status_code == 404
            assert missing.json()["error"]["status"] == "NOT_FOUND"
            assert (await public.get("/metrics")).status_code == 404
            assert (await public.get("/healthz")).status_code == 200
    finally:
        await stop_api(api)


@pytest.mark.one_stack
async def test_probes_and_scrapes_are_logged_at_debug(
    api: Api, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    with caplog.at_level(logging.DEBUG, logger="referral_service.access"):
        for path in ("/healthz", "/readyz", "/livez", "/metrics"):
            assert (await http.get(path)).status_code == 200
        await http.get("/openapi.json")
    levels = {
        record.route: record.levelno for record in caplog.records if record.name == "referral_service.access"
    }  # type: ignore[attr-defined]
    assert levels == {
        "GET /healthz": logging.DEBUG,
        "GET /readyz": logging.DEBUG,
        "GET /livez": logging.DEBUG,
        "GET /metrics": logging.DEBUG,
        "GET /openapi.json": logging.INFO,
    }


# --- the per-process accumulators (metrics.py): counted without a lock, flushed before a scrape ---


async def test_a_histogram_flush_gives_the_series_observe_would_have() -> None:
    """LocalHistogram writes into prometheus_client's histogram internals: pin that a flush is
    exactly a series of ``observe`` calls (bucket edges included), so an upgrade that changes
    them fails here."""
    from prometheus_client import CollectorRegistry, Histogram

    from referral_service import metrics

    registry = CollectorRegistry()
    reference = Histogram("reference_seconds", "r", buckets=metrics.LATENCY_BUCKETS, registry=registry)
    batched = Histogram("batched_seconds", "b", buckets=metrics.LATENCY_BUCKETS, registry=registry)
    local = metrics.LocalHistogram.of(batched)
    values = [0.0, 0.0001, 0.0005, 0.00050001, 0.001, 0.003, 0.25, 10.0, 10.5, 1e9, *metrics.LATENCY_BUCKETS]
    for seconds in values:
        reference.observe(seconds)
        local.observe(seconds)
    assert registry.get_sample_value("batched_seconds_count") == 0  # not flushed yet
    metrics.flush()

    def samples(name: str) -> list[tuple[str, frozenset[tuple[str, str]], float]]:
        return sorted(
            (sample.name.removeprefix(name), frozenset(sample.labels.items()), sample.value)
            for family in registry.collect()
            if family.name == name
            for sample in family.samples
        )

    assert samples("batched_seconds") == samples("reference_seconds")
    assert registry.get_sample_value("batched_seconds_count") == len(values)
    metrics.flush()  # nothing pending: nothing added twice
    assert samples("batched_seconds") == samples("reference_seconds")


@pytest.mark.one_stack
async def test_no_count_is_lost_at_a_graceful_stop(stack: Stack) -> None:
    from prometheus_client import REGISTRY

    from referral_service import metrics

    labels = {**LOOKUP, "grpc_type": "unary", "transport": "grpc", "grpc_code": "NotFound"}
    metrics.flush()
    before = REGISTRY.get_sample_value("grpc_server_handled_total", labels) or 0
    api = await start_api(stack)
    try:
        request = referral_pb2.GetReferralCodeByEmailRequest(email="nobody@example.com")
        for _ in range(5):
            await expect_error(api.referral.GetReferralCodeByEmail(request), grpc.StatusCode.NOT_FOUND)
    finally:
        await stop_api(api)
    assert REGISTRY.get_sample_value("grpc_server_handled_total", labels) == before + 5


_WORKER = """
import asyncio, sys
from referral_service import metrics

metrics.FLUSH_INTERVAL_SECONDS = 3600  # only a peer's request flushes
counter = metrics.LocalCounter.of(metrics.CACHE_LOOKUPS.labels(cache="peer-test", result="hit"))


async def main() -> None:
    flusher = metrics.Flusher(sys.argv[1])
    flusher.start()
    for _ in range(7):
        counter.inc()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await flusher.stop()


asyncio.run(main())
"""


async def test_a_scrape_has_another_worker_flush_its_pending_counts_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other worker flushes only on request here (an hour's interval): the scraping worker's
    request, answered before it renders, is what puts its 7 counts in the scrape."""
    import os
    import socket
    import sys

    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from referral_service import metrics

    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _WORKER,
        str(tmp_path),
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert worker.stdin is not None
    assert worker.stdout is not None
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
    labels = {"cache": "peer-test", "result": "hit"}
    scraper = metrics.Flusher(str(tmp_path))
    try:
        assert await asyncio.wait_for(worker.stdout.readline(), 30) == b"ready\n"
        assert registry.get_sample_value("referral_cache_lookups_total", labels) in (None, 0)
        scraper.start()
        await scraper.flush_everywhere()
        assert registry.get_sample_value("referral_cache_lookups_total", labels) == 7
    finally:
        await scraper.stop()
        worker.stdin.write(b"stop\n")
        await worker.stdin.drain()
        assert await asyncio.wait_for(worker.wait(), 30) == 0
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".sock")]  # both removed
    # a stopped worker's socket, left behind (killed), does not hold a scrape up: with a minute's
    # wait for answers, a scrape that waited for it would not finish within half a minute
    monkeypatch.setattr(metrics, "PEER_FLUSH_TIMEOUT_SECONDS", 60.0)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(str(tmp_path / "flush-999999.sock"))
    stale.close()
    scraper = metrics.Flusher(str(tmp_path))
    scraper.start()
    try:
        await asyncio.wait_for(scraper.flush_everywhere(), 30)
    finally:
        await scraper.stop()
