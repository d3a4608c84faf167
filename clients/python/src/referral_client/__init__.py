"""Typed Python client for the referral-service gRPC API (``referral.v1``).

The generated stubs and messages are in ``referral.v1`` (``auth_pb2``, ``auth_pb2_grpc``,
``referral_pb2``, ``referral_pb2_grpc``, ``errors_pb2``), with type stubs. This package adds:

- :func:`connect`: an asyncio channel with the bearer token as call credentials and errors
  raised as typed exceptions, and the two service stubs;
- :mod:`referral_client.errors`: one exception per ``ErrorReason``
  (``except EmailAlreadyRegistered``), with field violations and retry delay as attributes.

::

    async with referral_client.connect("referral.internal:50051", token=access_token) as client:
        me = await client.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest())
"""

from __future__ import annotations

from referral_client._channel import Client, ErrorInterceptor, connect
from referral_client._version import __version__
from referral_client.errors import FieldViolation, ReferralError, from_rpc_error

__all__ = [
    "Client",
    "ErrorInterceptor",
    "FieldViolation",
    "ReferralError",
    "__version__",
    "connect",
    "from_rpc_error",
]
