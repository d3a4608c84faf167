"""The gRPC transport into the request pipeline (``referral_service/pipeline/``).

One ``grpc.aio`` server interceptor wraps every unary-unary method of our services, once per
method (wrapped handlers are cached): per call it builds the ``Call`` from the servicer context
(one pass over the metadata, the peer), runs the method's chain with the request bytes (parsed
inside the chain, so a corrupt payload is INVALID_ARGUMENT with our error envelope instead of
grpc's UNKNOWN), sets the ``x-request-id`` trailer, and sends a failed call's
``google.rpc.Status`` with grpcio-status. Health and reflection pass through untouched.

On a port that requires client certificates, the call carries the identity of the one the
handshake verified, read from grpc's auth context (its URI SANs, ``peer_uri``, and subject
common name): ``pipeline/identity.py`` decides which name counts.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc
from google.rpc import status_pb2
from grpc_status import rpc_status

from referral_service.domain.errors import DomainError
from referral_service.pipeline import errors
from referral_service.pipeline.call import (
    AUTHORIZATION,
    END_USER_ADDRESS,
    REQUEST_ID,
    USER_AGENT,
    Call,
    CallFailed,
    request_id,
)
from referral_service.pipeline.chain import Pipeline
from referral_service.pipeline.identity import certificate_identity

Context = grpc.aio.ServicerContext[Any, Any]
RpcHandler = Any  # grpc.RpcMethodHandler, whose stubs describe the sync server only


class _Status(grpc.Status):
    def __init__(
        self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[tuple[str, str | bytes], ...]
    ) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


def grpc_status(status: status_pb2.Status, call_id: str) -> grpc.Status:
    """The status as grpc sends it: code, message, ``grpc-status-details-bin``, and the
    ``x-request-id`` trailer."""
    converted = rpc_status.to_status(status)
    return _Status(converted.code, converted.details, (*converted.trailing_metadata, (REQUEST_ID, call_id)))


def peer_identity(context: Context) -> str | None:
    """The verified client certificate's identity (None without one)."""
    properties = context.auth_context()
    uris = properties.get("peer_uri", ())
    names = properties.get("x509_common_name", ())
    if not uris and not names:
        return None
    return certificate_identity(
        [uri.decode("utf-8", "replace") for uri in uris], [name.decode("utf-8", "replace") for name in names]
    )


class ApiInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, pipeline: Pipeline, client_certificates: bool = False) -> None:
        """``client_certificates``: the port verifies client certificates (mTLS), so calls
        carry the certificate's identity."""
        self._pipeline = pipeline
        self._client_certificates = client_certificates
        self._handlers: dict[str, RpcHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[RpcHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> RpcHandler:
        method: str = handler_call_details.method
        cached = self._handlers.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None or not self._pipeline.handles(method):
            return handler
        wrapped: RpcHandler
        if handler.unary_unary is not None:
            chain = self._pipeline.build(method, handler.unary_unary, parse=handler.request_deserializer)
            wrapped = grpc.unary_unary_rpc_method_handler(
                self._transport(method, chain),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        elif handler.unary_stream is not None:
            chain = self._pipeline.build(method, handler.unary_stream, parse=handler.request_deserializer)
            wrapped = grpc.unary_stream_rpc_method_handler(
                self._stream_transport(method, chain),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        else:
            return handler
        self._handlers[method] = wrapped
        return wrapped

    def _stream_transport(self, method: str, chain: Callable[[Any, Call], Awaitable[Any]]) -> Any:
        """A server-streaming method: the chain (authentication, limits, error mapping) runs
        the servicer method, which validates and returns the stream; the stream is sent here,
        an error in it mapped as the chain maps one."""
        make_call = self._call_maker(method)

        async def behavior(raw: bytes, context: Context) -> AsyncIterator[Any]:
            call = make_call(context)
            try:
                stream = await chain(raw, call)
            except CallFailed as failed:
                await _abort(context, failed.status, call)
                return
            status: status_pb2.Status | None = None
            async with contextlib.aclosing(stream):
                try:
                    async for response in stream:
                        yield response
                except DomainError as error:
                    status = errors.from_domain(error, call.request_id)
                except Exception:
                    errors.log.exception(
                        "unhandled error in %s", method, extra={"request_id": call.request_id}
                    )
                    status = errors.internal(call.request_id)
            if status is not None:
                await _abort(context, status, call)
            context.set_trailing_metadata(((REQUEST_ID, call.request_id),))

        return behavior

    def _call_maker(self, method: str) -> Callable[[Context], Call]:
        address_header = self._pipeline.client_address_header
        client_certificates = self._client_certificates

        def make(context: Context) -> Call:
            started = time.perf_counter()
            authorization = given_id = end_user = user_agent = None
            forwarded: list[str] = []
            for key, value in context.invocation_metadata() or ():
                if key == AUTHORIZATION:
                    if authorization is None and isinstance(value, str):
                        authorization = value
                elif key == REQUEST_ID:
                    if given_id is None and isinstance(value, str):
                        given_id = value
                elif key == address_header and isinstance(value, str):
                    forwarded.append(value)
                elif key == END_USER_ADDRESS and end_user is None and isinstance(value, str):
                    end_user = value
                elif key == USER_AGENT and user_agent is None and isinstance(value, str):
                    user_agent = value
            return Call(
                method,
                "grpc",
                request_id(given_id),
                context.peer(),
                started,
                authorization,
                forwarded,
                end_user,
                peer_identity=peer_identity(context) if client_certificates else None,
                user_agent=user_agent,
            )

        return make

    def _transport(self, method: str, chain: Callable[[Any, Call], Awaitable[Any]]) -> Any:
        make_call = self._call_maker(method)

        async def behavior(raw: bytes, context: Context) -> Any:
            call = make_call(context)
            try:
                response = await chain(raw, call)
            except CallFailed as failed:
                await _abort(context, failed.status, call)
            context.set_trailing_metadata(((REQUEST_ID, call.request_id),))
            return response

        return behavior


async def _abort(context: Context, status: status_pb2.Status, call: Call) -> None:
    converted = grpc_status(status, call.request_id)
    # The code first: a tracing interceptor's context wrapper records it on the span
    # (abort_with_status passes it by); the abort sets it again with the details.
    context.set_code(converted.code)
    await cast(Any, context).abort_with_status(converted)
