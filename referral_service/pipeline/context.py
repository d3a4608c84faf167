"""The call's context (request id and principal in contextvars, for servicers and log records)
and the ONE access line per call, on logger ``referral_service.access``.

Fields of every line (``extra``): method, code, reason, duration_ms, request_id, peer,
peer_identity (the verified client certificate's identity, or None), user_id, transport; HTTP
lines add route (the template, never the raw path) and http_status. The HTTP gateway logs
requests that never reach an RPC (404, docs, ...) with ``log_access`` too, so that every HTTP
request has exactly one line.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import Any

from referral_service.domain.errors import Reason, Unauthenticated
from referral_service.domain.models import Principal
from referral_service.pipeline.call import Call, Handler
from referral_service.pipeline.errors import CANCELLED, CODE_NAMES, HTTP_STATUS, UNKNOWN

access_log = logging.getLogger("referral_service.access")

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
principal_var: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)


def current_principal() -> Principal:
    """The authenticated caller of this call (for servicers of methods that need a token)."""
    principal = principal_var.get()
    if principal is None:  # only reachable if a method's access rule is wrong
        raise Unauthenticated(Reason.TOKEN_MISSING, "this call needs an access token")
    return principal


#: The fields the text line's message already says (``/pkg.Svc/Method NOT_FOUND 0.4ms``): a text
#: line does not repeat them (``logs.TextFormatter``); a JSON line has every field.
_IN_MESSAGE = ("method", "code", "duration_ms")
_IN_MESSAGE_ROUTE = ("route", "code", "duration_ms")


def log_access(call: Call, http_status: int | None = None, level: int = logging.INFO) -> None:
    """The call's access line (at DEBUG for health probes and metrics scrapes)."""
    if not access_log.isEnabledFor(level):
        return
    elapsed_ms = (time.perf_counter() - call.started) * 1000
    code = CODE_NAMES.get(call.code, "UNKNOWN")
    principal = call.principal
    extra: dict[str, Any] = {
        "method": call.method,
        "code": code,
        "reason": call.reason,
        "duration_ms": round(elapsed_ms, 3),
        "request_id": call.request_id,
        "peer": call.peer,
        "peer_identity": call.peer_identity,
        "user_id": principal.user_id if principal is not None else None,
        "transport": call.transport,
    }
    if call.transport == "http":
        status = http_status if http_status is not None else HTTP_STATUS.get(call.code, 500)
        extra["route"] = call.route
        extra["http_status"] = status
    extra["_in_message"] = _IN_MESSAGE if call.method else _IN_MESSAGE_ROUTE
    access_log.log(level, "%s %s %.1fms", call.method or call.route, code, elapsed_ms, extra=extra)


def stage(inner: Handler) -> Handler:
    """Outermost: sets the contextvars and logs the call's line when it ends, however it ends."""

    async def in_context(request: Any, call: Call) -> Any:
        request_id_var.set(call.request_id)
        try:
            return await inner(request, call)
        except asyncio.CancelledError:
            call.code = CANCELLED
            raise
        except BaseException:
            if not call.code:  # CallFailed set its code already
                call.code = UNKNOWN
            raise
        finally:
            log_access(call)

    return in_context
