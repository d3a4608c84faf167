"""The chain of one method, composed once at start-up (or on a transport's first call)::

    metrics -> context + access log -> [deadline] -> error mapping -> [parse] -> [auth] -> [limits]
    -> handler

Stages that do not apply to the method are not in its chain: public methods have no
authentication stage, methods without declared limits no rate-limit stage, chains without a
``parse`` (the HTTP gateway hands in messages) no parse stage, and only a transport with its own
time limit (the gateway) a deadline stage. Each stage is one coroutine around the next.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError

from referral_service.domain.errors import InvalidArgument, Reason
from referral_service.pipeline import context, deadline, errors
from referral_service.pipeline import metrics as call_metrics
from referral_service.pipeline.auth import Authentication
from referral_service.pipeline.call import Call, Handler, Stage, Transport
from referral_service.pipeline.limits import RateLimits

#: Bytes -> the request message (a transport's deserializer); raises DecodeError.
Parse = Callable[[bytes], Any]


def _parse_stage(parse: Parse) -> Stage:
    def wrap(inner: Handler) -> Handler:
        async def parsed(raw: Any, call: Call) -> Any:
            try:
                request = parse(raw)
            except DecodeError:
                raise InvalidArgument(
                    Reason.VALIDATION_FAILED, "the request is not a valid protobuf message of this method"
                ) from None
            return await inner(request, call)

        return parsed

    return wrap


class Pipeline:
    def __init__(self, auth: Authentication, limits: RateLimits | None = None) -> None:
        self._auth = auth
        self._limits = limits
        for method in auth.rules:
            call_metrics.prepare(method, "grpc")

    def handles(self, method: str) -> bool:
        """True for the methods of our services (others, such as health, pass by)."""
        return method in self._auth.rules

    @property
    def client_address_header(self) -> str | None:
        """The header whose values transports put in ``Call.forwarded`` (None: no limits)."""
        return self._limits.address.header if self._limits is not None else None

    def build(
        self,
        method: str,
        handler: Handler,
        *,
        parse: Parse | None = None,
        timeout: float | None = None,
        transport: Transport = "grpc",
    ) -> Handler:
        """The composed handler of ``method`` on ``transport``: call it with the request (bytes
        when ``parse`` is given) and the Call; it returns the response or raises CallFailed."""
        stages: list[Stage | None] = [
            call_metrics.stage(method, transport),
            context.stage,
            deadline.stage(timeout) if timeout is not None else None,
            errors.stage,
            _parse_stage(parse) if parse is not None else None,
            self._auth.stage(method),
            self._limits.stage(method) if self._limits is not None else None,
        ]
        for stage in reversed(stages):
            if stage is not None:
                handler = stage(handler)
        return handler

    def handlers(
        self,
        servicers: Mapping[ServiceDescriptor, object],
        *,
        timeout: float | None = None,
        transport: Transport = "http",
    ) -> dict[str, Handler]:
        """``/package.Service/Method`` -> the composed handler calling the servicer's method
        in-process (for a transport that builds request messages itself: the HTTP gateway)."""
        return {
            f"/{service.full_name}/{method.name}": self.build(
                f"/{service.full_name}/{method.name}",
                getattr(servicer, method.name),
                timeout=timeout,
                transport=transport,
            )
            for service, servicer in servicers.items()
            for method in service.methods
        }
