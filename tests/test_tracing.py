"""OpenTelemetry tracing: the parent/child chain of a look-up that misses the cache (collected
in memory from the in-process server, over gRPC and HTTP, continuing the caller's W3C
traceparent), the trace id on the access line, no email in any span; the OTLP exporter of a real
process configured by the standard OTEL_* variables; and nothing of OpenTelemetry loaded when
tracing is off."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from referral.v1 import referral_pb2, referral_pb2_grpc

from referral_service.app import App, build_app
from tests.conftest import Stack
from tests.errors import expect_error
from tests.live import LiveServer

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"


@pytest.fixture
async def traced(stack: Stack) -> AsyncIterator[tuple[App, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    app = await build_app(stack.settings(tracing_enabled=True), span_exporter=exporter)
    await app.start()
    try:
        yield app, exporter
    finally:
        await app.stop(0, drain=0)


def chain(spans: tuple[ReadableSpan, ...], server: ReadableSpan) -> list[ReadableSpan]:
    """The server span's descendants, in start order."""
    ids = {server.context.span_id}
    found = []
    for span in sorted(spans, key=lambda s: s.start_time or 0):
        if span.parent is not None and span.parent.span_id in ids:
            ids.add(span.context.span_id)
            found.append(span)
    return found


def check_miss_chain(stack: Stack, spans: tuple[ReadableSpan, ...], server: ReadableSpan) -> list[str]:
    """The look-up's server span continues the caller's trace; its children are the cache look-up
    and the rate limit (queued together: one round trip), the database query and the cache
    fill, in that order."""
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert server.parent is not None
    assert format(server.parent.span_id, "016x") == CALLER_SPAN
    assert server.parent.is_remote
    children = chain(spans, server)
    for child in children:
        assert child.context.trace_id == server.context.trace_id
        assert child.kind is SpanKind.CLIENT
    names = [child.name for child in children]
    queries = [
        child
        for child in children
        if child.attributes
        and child.attributes.get("db.system")
        in (
            "postgresql",
            "sqlite",
        )
    ]
    statements = [str((query.attributes or {}).get("db.statement", "")) for query in queries]
    assert [statement.split()[0] for statement in statements if statement] == ["SELECT"], statements
    if stack.redis_url:
        redis = [
            child.name
            for child in children
            if child.attributes and child.attributes.get("db.system") == "redis"
        ]
        # The look-up is queued first, then the rate limit: both leave in one round trip.
        assert redis == ["EVALSHA cache.lookup", "EVALSHA rate_limit", "EVALSHA cache.fill"], names
        first_query = names.index(queries[0].name)
        assert names.index("EVALSHA cache.lookup") < first_query < names.index("EVALSHA cache.fill")
    return names


def no_email(spans: tuple[ReadableSpan, ...], email: str) -> None:
    for span in spans:
        exported = span.to_json()
        assert email not in exported, exported
        assert email.split("@")[0] not in exported, exported


@pytest.mark.all_stacks
async def test_a_cache_miss_over_grpc_is_one_trace_from_the_caller_to_the_database(
    traced: tuple[App, InMemorySpanExporter], stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    app, exporter = traced
    email = "traced.person@example.com"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = referral_pb2_grpc.ReferralServiceStub(channel)
        exporter.clear()
        with caplog.at_level(logging.INFO, logger="referral_service.access"):
            await expect_error(
                stub.GetReferralCodeByEmail(
                    referral_pb2.GetReferralCodeByEmailRequest(email=email),
                    metadata=(("traceparent", TRACEPARENT),),
                ),
                grpc.StatusCode.NOT_FOUND,
            )
    spans = exporter.get_finished_spans()
    (server,) = [span for span in spans if span.kind is SpanKind.SERVER]
    assert server.name == "/referral.v1.ReferralService/GetReferralCodeByEmail"
    assert server.attributes is not None
    assert server.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    check_miss_chain(stack, spans, server)
    no_email(spans, email)
    (line,) = [r for r in caplog.records if r.name == "referral_service.access"]
    assert line.trace_id == TRACE_ID  # type: ignore[attr-defined]
    assert line.span_id == format(server.context.span_id, "016x")  # type: ignore[attr-defined]


@pytest.mark.redis_stacks
async def test_a_cache_miss_over_http_is_one_trace_named_by_its_route(
    traced: tuple[App, InMemorySpanExporter], stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    app, exporter = traced
    email = "traced.http@example.com"
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as http:
        exporter.clear()
        with caplog.at_level(logging.INFO, logger="referral_service.access"):
            response = await http.get(
                f"/v1/referral-codes/by-email/{email}", headers={"traceparent": TRACEPARENT}
            )
        assert response.status_code == 404
    spans = exporter.get_finished_spans()
    (server,) = [span for span in spans if span.kind is SpanKind.SERVER]
    assert server.name == "GET /v1/referral-codes/by-email/{email}"
    assert server.attributes is not None
    assert server.attributes["http.route"] == "/v1/referral-codes/by-email/{email}"
    assert server.attributes["http.response.status_code"] == 404
    check_miss_chain(stack, spans, server)
    no_email(spans, email)
    (line,) = [r for r in caplog.records if r.name == "referral_service.access"]
    assert line.trace_id == TRACE_ID  # type: ignore[attr-defined]


@pytest.mark.one_stack
async def test_an_outbound_provider_call_is_a_child_span_without_the_email(stack: Stack) -> None:
    from tests.fake_http import FakeHttp
    from tests.vendors import Hunter

    hunter = await FakeHttp(Hunter()).start()
    exporter = InMemorySpanExporter()
    app = await build_app(
        stack.settings(tracing_enabled=True, hunter_api_key="k" * 20, hunter_base_url=f"{hunter.url}/v2"),
        span_exporter=exporter,
    )
    await app.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as http:
            exporter.clear()
            response = await http.post(
                "/v1/auth/register",
                json={"email": "valid-traced@example.com", "password": "correct horse battery staple"},
                headers={"traceparent": TRACEPARENT},
            )
            assert response.status_code == 200, response.text
    finally:
        await app.stop(0, drain=0)
        await hunter.close()
    spans = exporter.get_finished_spans()
    (server,) = [span for span in spans if span.kind is SpanKind.SERVER]
    outbound = [
        span
        for span in chain(spans, server)
        if {"http.method", "http.request.method"} & set(span.attributes or {})
    ]
    assert len(outbound) == 1, [span.name for span in spans]
    # the provider saw our trace (W3C traceparent on the outbound request)
    (request,) = hunter.requests
    assert request.headers["traceparent"].split("-")[1] == TRACE_ID
    no_email(spans, "valid-traced@example.com")


def test_tracing_off_loads_nothing_of_opentelemetry(tmp_path: Path) -> None:
    """The default: a whole start, a call and a stop without one OpenTelemetry module."""
    script = f"""
import asyncio, sys
from referral_service.app import build_app
from referral_service.config import Settings

async def main():
    settings = Settings(_env_file=None, data_dir={str(tmp_path)!r}, grpc_port=0, http_port=0, workers=1)
    app = await build_app(settings)
    await app.start()
    import httpx
    async with httpx.AsyncClient() as http:
        url = f"http://127.0.0.1:{{app.http_port}}/v1/referral-codes/by-email/a@example.com"
        assert (await http.get(url)).status_code == 404
    await app.stop(0, drain=0)

from referral_service.storage import migrate
migrate.upgrade("sqlite+aiosqlite:///{tmp_path}/referral.db")
asyncio.run(main())
loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry"))
assert not loaded, loaded
print("no opentelemetry")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFERRAL_")}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no opentelemetry" in result.stdout


class Collector:
    """An OTLP/gRPC trace collector on loopback that keeps what it receives."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.received = asyncio.Event()

    async def start(self) -> int:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        collector = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
            async def Export(self, request: Any, context: Any) -> Any:
                collector.requests.append(request)
                collector.received.set()
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        found = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    found.extend((resource, span) for span in scope.spans)
        return found


async def test_a_real_process_exports_its_spans_over_otlp_as_the_otel_variables_say(tmp_path: Path) -> None:
    collector = Collector()
    port = await collector.start()
    env = {
        "REFERRAL_TRACING_ENABLED": "true",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_SERVICE_NAME": "referral-test",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    server = LiveServer(tmp_path, "--migrate", "--workers", "1", env=env).start()
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = referral_pb2_grpc.ReferralServiceStub(channel)
            await expect_error(
                stub.GetReferralCodeByEmail(
                    referral_pb2.GetReferralCodeByEmailRequest(email="otlp@example.com"),
                    metadata=(("traceparent", TRACEPARENT),),
                    timeout=5,
                ),
                grpc.StatusCode.NOT_FOUND,
            )
        async with asyncio.timeout(30):
            while not any(span.kind == span.SPAN_KIND_SERVER for _, span in collector.spans()):
                collector.received.clear()
                await collector.received.wait()
    finally:
        output = server.stop()
        await collector.server.stop(0)
    assert server.returncode == 0, output
    (resource, span) = next((r, s) for r, s in collector.spans() if s.kind == s.SPAN_KIND_SERVER)
    assert resource["service.name"] == "referral-test"
    assert span.trace_id.hex() == TRACE_ID
    assert span.name == "/referral.v1.ReferralService/GetReferralCodeByEmail"
    (line,) = [line for line in output.splitlines() if "GetReferralCodeByEmail NOT_FOUND" in line]
    assert f"trace_id={TRACE_ID}" in line


@pytest.mark.redis_stacks
async def test_health_probes_are_not_traced(stack: Stack) -> None:
    """The background probe asks the database and Redis every interval: no trace of it."""
    exporter = InMemorySpanExporter()
    app = await build_app(
        stack.settings(tracing_enabled=True, health_probe_interval_seconds=0.05), span_exporter=exporter
    )
    probed = asyncio.Event()
    checks = 0
    check = app.db.check

    async def counted(within: float | None = None) -> str | None:
        nonlocal checks
        checks += 1
        if checks >= 3:
            probed.set()
        return await check(within)

    app.db.check = counted  # type: ignore[method-assign]
    await app.start()
    try:
        async with asyncio.timeout(30):
            await probed.wait()
    finally:
        await app.stop(0, drain=0)
    statements = [
        str((span.attributes or {}).get("db.statement", "")) for span in exporter.get_finished_spans()
    ]
    assert not [statement for statement in statements if "SELECT 1" in statement], statements
    assert not [span.name for span in exporter.get_finished_spans() if span.name.upper().startswith("PING")]
