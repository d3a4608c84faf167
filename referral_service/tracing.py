"""OpenTelemetry tracing, when ``REFERRAL_TRACING_ENABLED=true``.

Off (the default), nothing of OpenTelemetry is imported and nothing is instrumented: the
transports and adapters get ``None`` where a tracer would go and skip one ``if``.

On, ``start`` builds one tracer provider for the process (resource, sampler and exporter from the
standard ``OTEL_*`` variables, as the SDK reads them) and hands out what each part needs:

- server spans: gRPC through opentelemetry-instrumentation-grpc's aio server interceptor, HTTP
  through ``HttpServerSpans`` (the gateway's own span, named by the route template, so that no
  email from a path reaches a trace); both continue a W3C ``traceparent`` from the caller;
- child spans: the database (opentelemetry-instrumentation-sqlalchemy, statements without their
  parameters), Redis (opentelemetry-instrumentation-redis for commands, sanitised; a span per
  auto-pipelined script call from ``ClientSpans``), outbound HTTP (opentelemetry-instrumentation-
  httpx, the URL without its query: it carries an email);
- log records carry ``trace_id`` and ``span_id`` while a span is current, so every access line
  names its trace.

Exporters (``OTEL_TRACES_EXPORTER``): ``otlp`` (default; ``OTEL_EXPORTER_OTLP_PROTOCOL`` ``grpc``,
the default, or ``http/protobuf``; endpoint, headers, timeout from ``OTEL_EXPORTER_OTLP_*``),
``console`` or ``none``. Spans leave in batches (``OTEL_BSP_*``) from a thread of each process.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("referral_service.tracing")

EXPORTERS = ("otlp", "console", "none")
PROTOCOLS = ("grpc", "http/protobuf")


class TracingConfigError(ValueError):
    """An ``OTEL_*`` variable the service cannot use; the message names it."""


def exporter_names(environ: Mapping[str, str]) -> tuple[list[str], str]:
    """The exporters ``OTEL_TRACES_EXPORTER`` names and the OTLP protocol, checked."""
    names = [name.strip() for name in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if name.strip()]
    for name in names:
        if name not in EXPORTERS:
            raise TracingConfigError(
                f"OTEL_TRACES_EXPORTER: {name!r} is not supported; use {', '.join(EXPORTERS)}"
            )
    variable = (
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
        if environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        else "OTEL_EXPORTER_OTLP_PROTOCOL"
    )
    protocol = environ.get(variable, "grpc").strip() or "grpc"
    if "otlp" in names and protocol not in PROTOCOLS:
        raise TracingConfigError(f"{variable}: {protocol!r} is not supported; use {' or '.join(PROTOCOLS)}")
    return [name for name in names if name != "none"], protocol


def check_environment() -> None:
    """Raise ``TracingConfigError`` for an ``OTEL_*`` choice the service cannot honour (checked
    with the rest of the configuration, before any worker starts)."""
    exporter_names(os.environ)


def _exporters(environ: Mapping[str, str]) -> list[Any]:
    names, protocol = exporter_names(environ)
    exporters: list[Any] = []
    for name in names:
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        elif protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        else:
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter as HttpExporter,
                )
            except ImportError:
                raise TracingConfigError(
                    "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf needs opentelemetry-exporter-otlp-proto-http"
                ) from None
            exporters.append(HttpExporter())
    return exporters


class ClientSpans:
    """A client span per call to a dependency the instrumentation packages do not see (the
    Redis auto-pipeline writes batches straight to its connection)."""

    def __init__(self, tracer: Any, attributes: Mapping[str, Any]) -> None:
        from opentelemetry.trace import SpanKind

        self._tracer = tracer
        self._kind = SpanKind.CLIENT
        self._attributes = dict(attributes)

    @contextlib.contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[Any]:
        with self._tracer.start_as_current_span(
            name, kind=self._kind, attributes={**self._attributes, **attributes}
        ) as span:
            yield span

    def start(self, name: str, **attributes: Any) -> Any:
        """A span started now, a child of the current one, without becoming current (for a
        call that is queued now and awaited later); the caller ends it."""
        return self._tracer.start_span(name, kind=self._kind, attributes={**self._attributes, **attributes})


class HttpServerSpans:
    """The gateway's server span per HTTP request: continues the caller's ``traceparent``, is
    named ``METHOD /route/{template}`` once the route is known, and records the status."""

    def __init__(self, tracer: Any) -> None:
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self._tracer = tracer
        self._extract = propagate.extract
        self._kind = SpanKind.SERVER
        self._error = Status(StatusCode.ERROR)

    @contextlib.contextmanager
    def span(self, scope: Mapping[str, Any]) -> Iterator[Callable[[str, int], None]]:
        """Yields ``finish(route_template, status)``."""
        carrier = {
            key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope.get("headers", ())
        }
        method = str(scope.get("method", "")).upper()
        attributes = {
            "http.request.method": method,
            "url.scheme": scope.get("scheme", "http"),
            "network.protocol.version": scope.get("http_version", "1.1"),
        }
        server = scope.get("server")
        if server:
            attributes["server.port"] = server[1]
        with self._tracer.start_as_current_span(
            method, context=self._extract(carrier), kind=self._kind, attributes=attributes
        ) as span:

            def finish(route: str, status: int) -> None:
                if route:
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(self._error)

            yield finish


async def _strip_query(span: Any, request: Any) -> None:
    """httpx request hook (async: an async client calls only async hooks): the URL attributes
    without the query (Hunter's carries the email)."""
    attributes = getattr(span, "attributes", None) or {}
    for key in ("url.full", "http.url"):
        value = attributes.get(key)
        if isinstance(value, str):
            parts = urlsplit(value)
            span.set_attribute(key, urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")))


class _TraceIds:
    """Log record factory: ``trace_id`` and ``span_id`` on every record made while a span is
    current."""

    def __init__(self, previous: Callable[..., logging.LogRecord]) -> None:
        from opentelemetry.trace import get_current_span

        self.previous = previous
        self._current = get_current_span

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.previous(*args, **kwargs)
        context = self._current().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        return record


@dataclass
class Tracing:
    provider: Any
    _undo: list[Callable[[], None]] = field(default_factory=list)

    def tracer(self, name: str) -> Any:
        return self.provider.get_tracer(name)

    def grpc_interceptor(self) -> Any:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        return aio_server_interceptor(tracer_provider=self.provider)  # type: ignore[no-untyped-call]

    def http_server_spans(self) -> HttpServerSpans:
        return HttpServerSpans(self.tracer("referral_service.gateway"))

    def redis_spans(self, url: str) -> ClientSpans:
        parts = urlsplit(url)
        attributes: dict[str, Any] = {"db.system": "redis", "db.system.name": "redis"}
        if parts.hostname:
            attributes["server.address"] = parts.hostname
            attributes["server.port"] = parts.port or 6379
        return ClientSpans(self.tracer("referral_service.redis"), attributes)

    def instrument_database(self, engines: list[Any]) -> None:
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

        instrumentor = SQLAlchemyInstrumentor()
        # The package declares SQLAlchemy < 2.1; the engine events it hooks are the same in
        # 2.1 (tests/test_tracing.py checks the spans), so its version check is skipped.
        instrumentor.instrument(
            skip_dep_check=True,
            engines=[engine.sync_engine for engine in engines],
            tracer_provider=self.provider,
            enable_commenter=False,
        )
        self._undo.append(instrumentor.uninstrument)

    def instrument_redis(self) -> None:
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        instrumentor = RedisInstrumentor()
        instrumentor.instrument(tracer_provider=self.provider)
        self._undo.append(instrumentor.uninstrument)

    def instrument_http_client(self, client: Any) -> None:
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        HTTPXClientInstrumentor.instrument_client(
            client, tracer_provider=self.provider, request_hook=_strip_query
        )

    @contextlib.contextmanager
    def suppressed(self) -> Iterator[None]:
        """No spans from the instrumentation packages in this context, nor in the tasks made in
        it (they copy it): the health probes would otherwise start a trace every few seconds."""
        from opentelemetry.instrumentation.utils import suppress_instrumentation

        with suppress_instrumentation():
            yield

    def shutdown(self) -> None:
        """Undo the instrumentation, flush and stop the exporters."""
        for undo in reversed(self._undo):
            with contextlib.suppress(Exception):
                undo()
        self._undo.clear()
        self.provider.shutdown()


def start(version: str, exporter: Any | None = None) -> Tracing:
    """The process's tracing: a provider exporting to ``exporter`` (tests: an in-memory one,
    synchronously) or to the exporters the ``OTEL_*`` variables name (in batches)."""
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    resource = Resource.create({SERVICE_VERSION: version})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win when they name the service.
        resource = resource.merge(Resource({SERVICE_NAME: "referral-service"}))
    provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER(_ARG)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        for each in _exporters(os.environ):
            provider.add_span_processor(BatchSpanProcessor(each))
    tracing = Tracing(provider)
    factory = logging.getLogRecordFactory()
    logging.setLogRecordFactory(_TraceIds(factory))
    tracing._undo.append(lambda: logging.setLogRecordFactory(factory))
    return tracing
