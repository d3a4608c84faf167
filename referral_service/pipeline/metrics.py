"""The metrics stage: every RPC, whichever transport brought it, counted with the conventional
gRPC server metrics (``metrics.py``): started, handled by status code, and the time from the
transport receiving the call (``Call.started``) to its outcome.

Outermost in the chain, so that it sees the code the inner stages settled on (the error
mapping's, or CANCELLED/UNKNOWN from the context stage). The labelled series of each method are
made once, when its chain is built; a handled series per status code on its first use. A call
records into the per-process accumulators of ``metrics.py`` (integer adds, no lock), flushed to
the exported series every second and before each scrape.
"""

from __future__ import annotations

import time
from typing import Any

from referral_service import metrics
from referral_service.pipeline.call import Call, Handler, Stage, Transport


def prepare(method: str, transport: Transport) -> None:
    """Make ``method``'s series on ``transport`` at start-up (gRPC chains are built on a method's
    first call), so that every method shows from the first scrape, at 0."""
    stage(method, transport)


def stage(method: str, transport: Transport) -> Stage:
    """The metrics stage of ``method`` (``/package.Service/Method``) on ``transport``."""
    service, _, name = method.lstrip("/").partition("/")
    labels = {"grpc_service": service, "grpc_method": name, "grpc_type": "unary", "transport": transport}
    started = metrics.LocalCounter.of(metrics.GRPC_STARTED.labels(**labels))
    handling = metrics.LocalHistogram.of(metrics.GRPC_HANDLING.labels(**labels))
    handled_by_code: dict[int, metrics.LocalCounter] = {}

    def handled(code: int) -> metrics.LocalCounter:
        child = handled_by_code.get(code)
        if child is None:
            child = metrics.LocalCounter.of(
                metrics.GRPC_HANDLED.labels(**labels, grpc_code=metrics.GRPC_CODE_NAMES.get(code, "Unknown"))
            )
            handled_by_code[code] = child
        return child

    handled(0)  # an OK series from the start: rates and ratios exist before the first call

    observe, counters = handling.observe, handled_by_code
    now = time.perf_counter

    def wrap(inner: Handler) -> Handler:
        async def measured(request: Any, call: Call) -> Any:
            started.n += 1
            try:
                return await inner(request, call)
            finally:
                observe(now() - call.started)
                (counters.get(call.code) or handled(call.code)).n += 1

        return measured

    return wrap
