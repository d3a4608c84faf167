"""A transport's own time limit on a call (the HTTP gateway's ``REFERRAL_HTTP_TIMEOUT_SECONDS``;
gRPC clients send their deadline and grpc enforces it). Past it the rest of the chain is
cancelled and the call fails with DEADLINE_EXCEEDED (ErrorReason CANCELLED)."""

from __future__ import annotations

import asyncio
from typing import Any

from referral_service.domain.errors import Reason
from referral_service.pipeline import errors
from referral_service.pipeline.call import Call, Handler, Stage


def stage(seconds: float) -> Stage:
    def wrap(inner: Handler) -> Handler:
        async def bounded(request: Any, call: Call) -> Any:
            scope = asyncio.timeout(seconds)
            try:
                async with scope:
                    return await inner(request, call)
            except TimeoutError:
                if not scope.expired():
                    raise  # a TimeoutError of the call itself: the error stage mapped it already
                status = errors.build_status(
                    errors.DEADLINE_EXCEEDED,
                    f"the call did not finish within {seconds:g}s",
                    reason=Reason.CANCELLED,
                    request_id=call.request_id,
                )
                raise errors.failed(call, status, Reason.CANCELLED.value) from None

        return bounded

    return wrap
