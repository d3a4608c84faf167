"""One RPC call as the pipeline sees it, whichever transport brought it.

A transport builds a ``Call`` from what arrived (the gRPC metadata and peer, or the HTTP headers
and client), runs the method's chain with the request message and the call, and sends the
response, or the ``google.rpc.Status`` of a ``CallFailed``, in its own way.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from google.rpc import status_pb2

from referral_service.domain.models import Principal

#: The metadata (gRPC) or header (HTTP) names the pipeline reads, lower-case.
AUTHORIZATION = "authorization"
REQUEST_ID = "x-request-id"
#: Metadata (gRPC) or header (HTTP) with the end user's address, from a service acting for them.
END_USER_ADDRESS = "end-user-address"
USER_AGENT = "user-agent"

Transport = Literal["grpc", "http"]


@dataclass(slots=True, eq=False)
class Call:
    #: ``/referral.v1.AuthService/Login``
    method: str
    transport: Transport
    #: The caller's ``x-request-id`` when sane, else one made here (see ``request_id``).
    request_id: str
    #: The client's address in gRPC's peer form (``ipv4:192.0.2.7:5555``, ``ipv6:[::1]:443``),
    #: for HTTP too: the TCP client of the HTTP connection.
    peer: str
    #: ``perf_counter()`` when the transport received the call (the access line's duration).
    started: float
    #: The ``authorization`` metadata or header, as sent.
    authorization: str | None = None
    #: Every value of the client-address header (``x-forwarded-for``), believed only when the
    #: peer is a trusted proxy.
    forwarded: Sequence[str] = ()
    #: The ``end-user-address`` metadata or header, as sent: the end user's IP address that a
    #: service calling on their behalf forwards (believed only from such services).
    end_user: str | None = None
    #: The ``user-agent`` metadata or header, as sent (recorded with a login session).
    user_agent: str | None = None
    #: Who the client certificate names (``pipeline/identity.py``: its SPIFFE ID, else its
    #: subject CN), set only when the TLS handshake verified that certificate against the
    #: configured client CA; None without one.
    peer_identity: str | None = None
    #: HTTP only: the route template (``GET /v1/referral-codes/by-email/{email}``), never the raw
    #: path, so that no email from a path or query reaches the logs.
    route: str = ""
    #: Set by authentication for methods that need a token.
    principal: Principal | None = None
    #: Set by a servicer whose response leaves fields unset on purpose (a public projection):
    #: JSON then shows only the fields that are set, not every field at its default (where a
    #: 0 ``maxUses`` would read as "unlimited").
    sparse_response: bool = False
    #: The outcome, as a ``google.rpc.Code`` number and our ``ErrorReason`` name ("" on success).
    code: int = 0
    reason: str = ""


#: The rest of the chain: the request message and the call in, the response message out.
Handler = Callable[[Any, Call], Awaitable[Any]]
#: One concern of the pipeline: wraps the rest of the chain.
Stage = Callable[[Handler], Handler]


class CallFailed(Exception):
    """The call failed; ``status`` is what the client gets (``code``, ``message`` and details:
    exactly one ErrorInfo, a RequestInfo, and BadRequest / QuotaFailure / RetryInfo as they
    apply)."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status


_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: Request ids the server makes: a random per-process prefix and a counter (unique across
#: processes and restarts, and far cheaper than a uuid4 per call).
_REQUEST_ID_PREFIX = os.urandom(8).hex()
_request_counter = itertools.count(1)


def request_id(given: str | None) -> str:
    """The caller's ``x-request-id`` when it is a sane id, else a new one (gRPC and HTTP alike)."""
    if given and _REQUEST_ID_RE.fullmatch(given):
        return given
    return f"{_REQUEST_ID_PREFIX}{next(_request_counter):016x}"


def ip_peer(host: str | None, port: int | None) -> str:
    """An HTTP client's address in gRPC's peer form, so both transports key and log alike."""
    if not host:
        return ""
    if ":" in host:
        return f"ipv6:[{host}]:{port or 0}"
    return f"ipv4:{host}:{port or 0}"
