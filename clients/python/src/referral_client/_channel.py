"""The channel factory: TLS or loopback plaintext, the bearer token as call credentials, typed
errors."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
from referral.v1 import auth_pb2_grpc, referral_pb2_grpc

from referral_client.errors import from_rpc_error

if TYPE_CHECKING:
    from referral.v1.auth_pb2_grpc import AuthServiceAsyncStub
    from referral.v1.referral_pb2_grpc import ReferralServiceAsyncStub

#: A token, or a function returning the current one (called before every call, in gRPC's
#: credentials thread: refresh there, or hand over a value another task keeps fresh).
Token = str | Callable[[], str]


class ErrorInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Raises a failed call's typed exception (see :func:`referral_client.from_rpc_error`)."""

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        call = await continuation(client_call_details, request)
        try:
            return await call
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None


class _Bearer(grpc.AuthMetadataPlugin):
    def __init__(self, token: Token) -> None:
        self._token = token

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        try:
            token = self._token() if callable(self._token) else self._token
        except Exception as error:  # the token source failed: the call fails UNAVAILABLE with it
            callback((), error)
            return
        callback((("authorization", f"Bearer {token}"),), None)


def _host(target: str) -> str:
    """The host of a gRPC target: ``host:port``, ``[v6]:port``, ``dns:///host:port``,
    ``ipv4:a.b.c.d:port``."""
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
            break
    if target.startswith("["):
        return target[1 : target.find("]")]
    return target.rsplit(":", 1)[0] if target.count(":") == 1 else target


def is_loopback(target: str) -> bool:
    """Whether ``target`` names this machine (``localhost``, 127.0.0.0/8, ``::1``) or a Unix
    socket: the only places a token travels without TLS."""
    if target.startswith("unix:"):
        return True
    host = _host(target)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Client:
    """A channel and the service stubs bound to it; ``async with`` closes the channel."""

    channel: grpc.aio.Channel
    auth: AuthServiceAsyncStub
    referrals: ReferralServiceAsyncStub

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


def connect(
    target: str,
    *,
    token: Token | None = None,
    tls: bool | None = None,
    root_certificates: bytes | None = None,
    private_key: bytes | None = None,
    certificate_chain: bytes | None = None,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> Client:
    """An asyncio channel to the service at ``target`` (``host:port``) and its stubs.

    - ``token``: a user access token or a service token, sent as ``authorization: Bearer``
      call credentials on every call (a callable is asked before each call).
    - ``tls``: TLS unless ``target`` is a loopback address or a Unix socket (then plaintext).
      ``root_certificates`` (PEM) trusts a private CA; ``private_key`` and ``certificate_chain``
      present a client certificate (mTLS). gRPC sends call credentials only over TLS or to a
      loopback address, so a token with ``tls=False`` to another host is refused here rather
      than silently dropped.
    - Failed calls raise the typed exceptions of :mod:`referral_client.errors`.
    """
    loopback = is_loopback(target)
    use_tls = not loopback if tls is None else tls
    chain: list[grpc.aio.ClientInterceptor] = [ErrorInterceptor(), *interceptors]
    channel_options = list(options)
    if use_tls:
        credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
    elif token is not None:
        if not loopback:
            raise ValueError(
                f"refusing to send a token in plaintext to {target}: use TLS (tls=True), "
                "or a loopback address"
            )
        local = grpc.LocalConnectionType
        kind = local.UDS if target.startswith("unix:") else local.LOCAL_TCP
        credentials = grpc.local_channel_credentials(kind)
    else:
        channel = grpc.aio.insecure_channel(target, options=channel_options, interceptors=chain)
        return _client(channel)
    if token is not None:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.metadata_call_credentials(_Bearer(token))
        )
    return _client(grpc.aio.secure_channel(target, credentials, options=channel_options, interceptors=chain))


def _client(channel: grpc.aio.Channel) -> Client:
    return Client(
        channel=channel,
        auth=auth_pb2_grpc.AuthServiceStub(channel),
        referrals=referral_pb2_grpc.ReferralServiceStub(channel),
    )
