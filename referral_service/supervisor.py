"""Multi-process serving: N worker processes share the gRPC port with SO_REUSEPORT.

Before anything starts, ``claim_ports`` makes sure nobody else serves on our ports: SO_REUSEPORT
would otherwise let a second server (another data directory, another database) silently share
them with the first. The parent applies migrations once, then starts the workers (``spawn``:
each builds its own event loop, database pool and Redis client after it starts; nothing is
inherited across a fork). Each worker tells the parent when it serves; a worker that fails
before that (its database unreachable, say) stops the whole server with its one-line reason and
exit code 1, never a restart loop. SIGTERM or SIGINT to the parent is forwarded to every
worker, which drains and stops; a worker that dies after it served is reported and replaced
(with a back-off, and the parent gives up if workers keep crashing at once).

The workers' metrics go to a private directory the parent makes and removes
(``PROMETHEUS_MULTIPROC_DIR``), so that whichever worker answers a scrape adds up all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
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


class PortInUse(OSError):
    """Someone already listens on one of our ports; the message says which."""


def _listeners(settings: Settings) -> list[tuple[str, str, int]]:
    found = [("gRPC", settings.server.grpc_host, settings.server.grpc_port)]
    if settings.http.enabled:
        found.append(("HTTP", settings.http.host, settings.http.port))
    if settings.metrics.enabled and settings.metrics.port is not None:
        found.append(("metrics", settings.metrics.host, settings.metrics.port))
    return [listener for listener in found if listener[2] != 0]


def claim_ports(settings: Settings, *, shared: bool) -> list[socket.socket]:
    """Refuse to start when another process listens on one of our ports (``PortInUse``).

    A plain bind (no SO_REUSEPORT) of each port fails while any socket is bound there, ours or
    anyone's. When our listeners will share their ports (``shared``: SO_REUSEPORT, several
    workers), a second server of ours could pass that test at the same moment as this one; so
    each port is also claimed with an abstract Unix socket (Linux; per network namespace, like
    the ports), held until this process exits: whoever binds it first serves, the other is told.
    Returns the held claims."""
    held: list[socket.socket] = []
    try:
        for name, host, port in _listeners(settings):
            if shared and sys.platform.startswith("linux"):
                claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    claim.bind(f"\0referral-service:tcp:{port}")
                except OSError:
                    claim.close()
                    raise PortInUse(
                        f"cannot listen on {host}:{port} ({name}): another referral-service is serving on it"
                    ) from None
                held.append(claim)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((host, port))
                except OSError as error:
                    reason = "another process listens on it" if error.errno == 98 else error.strerror
                    raise PortInUse(f"cannot listen on {host}:{port} ({name}): {reason}") from None
    except BaseException:
        for claim in held:
            claim.close()
        raise
    return held


async def serve(
    settings: Settings,
    migrate_first: bool,
    metrics_dir: str | None = None,
    ready: Callable[[], None] | None = None,
) -> None:
    """One server process: build the app, serve until SIGTERM/SIGINT, drain, stop. ``ready`` is
    called once it serves."""
    from referral_service.app import build_app, migrate_database

    if migrate_first:
        await migrate_database(settings)
    app = await build_app(settings, metrics_dir=metrics_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = loop.create_task(app.start())
    stopped = loop.create_task(stop.wait())
    try:
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # told to stop while waiting for the database
            starting.cancel()
        await starting
    except BaseException:
        stopped.cancel()
        await app.stop(0, drain=0)
        if stop.is_set():
            return
        raise
    if ready is not None:
        ready()
    # What start-up built (modules, descriptors, pools) lives as long as the process: keep it
    # out of the cyclic collector, so collections under load walk only the objects of calls.
    gc.freeze()
    await stop.wait()
    log.info(
        "shutting down: draining in-flight calls for up to %.1fs", settings.server.shutdown_grace_seconds
    )
    await app.stop()


def _worker(settings: Settings, index: int, metrics_dir: str, parent: Connection) -> None:
    """A worker: serves, tells the parent ``("ready", "")`` once it does, or ``("failed",
    reason)`` and exits 1 when it cannot start (the parent logs the reason once)."""
    from referral_service.startup import StartupError

    logs.configure(settings.logging.level, settings.logging.format.value, worker=index)
    try:
        run_event_loop(
            settings,
            serve(
                settings,
                migrate_first=False,
                metrics_dir=metrics_dir,
                ready=lambda: parent.send(("ready", "")),
            ),
        )
    except (StartupError, OSError) as error:
        with contextlib.suppress(OSError):
            parent.send(("failed", str(error)))
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def serve_workers(settings: Settings, workers: int, migrate_first: bool = False) -> int:
    """Run ``workers`` worker processes until SIGTERM/SIGINT; the exit code. Raises
    ``PortInUse`` or ``StartupError`` when it cannot start."""
    from referral_service.app import check_tls_files

    check_tls_files(settings)  # once, here, rather than in each worker
    claims = claim_ports(settings, shared=True)
    try:
        if migrate_first:
            from referral_service.app import migrate_database

            asyncio.run(migrate_database(settings))
    except BaseException:
        for claim in claims:
            claim.close()
        raise
    # The workers' metrics files: a private directory, gone when the server stops. It is named
    # before any worker imports prometheus_client (which reads it at import).
    metrics_dir = tempfile.mkdtemp(prefix="referral-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        return _supervise(settings, workers, metrics_dir)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        for claim in claims:
            claim.close()


def _supervise(settings: Settings, workers: int, metrics_dir: str) -> int:
    context = multiprocessing.get_context("spawn")
    child_settings = settings.replace(so_reuseport=True, workers=workers)
    processes: dict[int, BaseProcess] = {}
    pipes: dict[int, Connection] = {}
    started: dict[int, float] = {}
    ready: set[int] = set()
    failures: dict[int, str] = {}
    quick_crashes = 0
    stopping = False
    announced = False

    def start(index: int) -> None:
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(
            target=_worker, args=(child_settings, index, metrics_dir, sender), name=f"worker-{index}"
        )
        process.start()
        sender.close()
        processes[index] = process
        pipes[index] = receiver
        started[index] = time.monotonic()

    def read(index: int) -> None:
        connection = pipes[index]
        while connection.poll():
            try:
                kind, detail = connection.recv()
            except (EOFError, OSError):
                pipes.pop(index, None)
                return
            if kind == "ready":
                ready.add(index)
            else:
                failures[index] = detail

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
    exit_code = 0
    while processes:
        wait([p.sentinel for p in processes.values()] + list(pipes.values()), timeout=1.0)
        for index in list(pipes):
            if index in processes:
                read(index)
        if not announced and len(ready) == workers:
            announced = True
            log.info(
                "serving gRPC on %s:%d with %d workers",
                settings.server.grpc_host,
                settings.server.grpc_port,
                workers,
            )
            if settings.redis.url is None:
                log.warning(
                    "%d workers without Redis: the look-up cache is off (each worker would hold its "
                    "own copy); set REFERRAL_REDIS_URL to share one",
                    workers,
                )
        for index, process in list(processes.items()):
            if process.is_alive():
                continue
            process.join()
            if index in pipes:
                read(index)
            del processes[index]
            pipe = pipes.pop(index, None)
            if pipe is not None:
                pipe.close()
            _forget(process)
            if stopping:
                continue
            if index not in ready:
                # Failed before serving: the same would happen again. Stop, say why once.
                stopping = True
                log.error(
                    "%s",
                    failures.get(index)
                    or f"worker {index} exited with code {process.exitcode} before it could serve",
                )
                exit_code = 1
                on_signal(signal.SIGTERM, None)
                continue
            ready.discard(index)
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
    if exit_code == 0:  # told to stop (a failed start said why already)
        log.info("all workers stopped")
    return exit_code


def _forget(process: BaseProcess) -> None:
    """A dead worker's live gauges no longer count (its counters and histograms still do)."""
    if process.pid is None:
        return
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
