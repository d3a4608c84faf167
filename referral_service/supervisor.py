"""Multi-process serving: N worker processes share the gRPC port with SO_REUSEPORT.

The parent applies migrations once, then starts the workers (``spawn``: each builds its own
event loop, database pool and Redis client after it starts; nothing is inherited across a fork).
SIGTERM or SIGINT to the parent is forwarded to every worker, which drains and stops; a worker
that dies on its own is reported and replaced (with a back-off, and the parent gives up if
workers keep crashing at once).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import signal
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

from referral_service import logs
from referral_service.config import Settings
from referral_service.domain.backoff import backoff_delay

log = logging.getLogger("referral_service.supervisor")

#: A worker dying sooner than this after its start counts as a crash loop.
_CRASH_WINDOW = 10.0
_MAX_QUICK_CRASHES = 5


def run_event_loop(settings: Settings, main: object) -> None:
    """Run ``main`` (a coroutine) on uvloop when configured or available, else asyncio."""
    choice = settings.server.event_loop
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise RuntimeError("REFERRAL_EVENT_LOOP=uvloop but uvloop is not installed") from None
        else:
            uvloop.run(main)  # type: ignore[arg-type]
            return
    asyncio.run(main)  # type: ignore[arg-type]


async def serve(settings: Settings, migrate_first: bool) -> None:
    """One server process: build the app, serve until SIGTERM/SIGINT, drain, stop."""
    from referral_service.app import build_app

    if migrate_first:
        from referral_service.storage import migrate  # alembic only where it is needed

        await migrate.upgrade_async(settings.effective_database_url)
    app = await build_app(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    # What start-up built (modules, descriptors, pools) lives as long as the process: keep it
    # out of the cyclic collector, so collections under load walk only the objects of calls.
    gc.freeze()
    await stop.wait()
    log.info(
        "shutting down: draining in-flight calls for up to %.1fs", settings.server.shutdown_grace_seconds
    )
    await app.stop()


def _worker(settings: Settings, index: int) -> None:
    logs.configure(settings.logging.level, settings.logging.format.value, worker=index)
    run_event_loop(settings, serve(settings, migrate_first=False))


def serve_workers(settings: Settings, workers: int) -> int:
    from referral_service.app import check_tls_files

    if settings.server.grpc_port == 0:
        raise SystemExit("--workers > 1 needs a fixed port (REFERRAL_GRPC_PORT)")
    check_tls_files(settings)  # once, here, rather than in each worker's crash loop
    if settings.redis.url is None:
        log.warning(
            "%d workers without Redis: the look-up cache is off (each worker would hold its own "
            "copy); set REFERRAL_REDIS_URL to share one",
            workers,
        )
    context = multiprocessing.get_context("spawn")
    child_settings = settings.replace(so_reuseport=True, workers=workers)
    processes: dict[int, BaseProcess] = {}
    started: dict[int, float] = {}
    quick_crashes = 0
    stopping = False

    def start(index: int) -> None:
        process = context.Process(target=_worker, args=(child_settings, index), name=f"worker-{index}")
        process.start()
        processes[index] = process
        started[index] = time.monotonic()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if not stopping:
            log.info("received %s: draining %d workers", signal.Signals(signum).name, len(processes))
        stopping = True
        for process in processes.values():
            if process.is_alive() and process.pid is not None:
                process.terminate()  # SIGTERM: the worker drains and stops

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for index in range(workers):
        start(index)
    log.info(
        "serving gRPC on %s:%d with %d workers", settings.server.grpc_host, settings.server.grpc_port, workers
    )
    exit_code = 0
    while processes:
        wait([p.sentinel for p in processes.values()], timeout=1.0)
        for index, process in list(processes.items()):
            if process.is_alive():
                continue
            process.join()
            del processes[index]
            if stopping:
                continue
            lived = time.monotonic() - started[index]
            log.error(
                "worker %d exited with code %s after %.1fs; replacing it", index, process.exitcode, lived
            )
            quick_crashes = quick_crashes + 1 if lived < _CRASH_WINDOW else 0
            if quick_crashes > _MAX_QUICK_CRASHES:
                log.critical("workers keep crashing at start-up; giving up")
                stopping = True
                exit_code = 1
                on_signal(signal.SIGTERM, None)
                continue
            time.sleep(backoff_delay(quick_crashes, 0.2, 5.0))
            start(index)
    log.info("all workers stopped")
    return exit_code
