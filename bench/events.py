"""Commit-to-watcher latency of WatchEvents: ``python -m bench.events`` (``make bench-events``).

The service runs as in production (``python -m referral_service serve``, PostgreSQL, two
workers sharing the port, so most watchers sit on another worker than the writer and each
event crosses workers through LISTEN/NOTIFY). 100 WatchEvents streams are opened; a writer
creates and deletes a referral code in turn (each writes one event), one call at a time, and
every watcher notes when each event arrives. Reported, per event and watcher: from the start
of the writing call to the arrival (an upper bound of commit-to-watcher: it includes the
writing call itself, whose own latency is reported beside it), p50 / p99.

Load generator and server share the machine's cores; the figures are an upper bound.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import grpc
from google.protobuf import duration_pb2
from referral.v1 import auth_pb2, auth_pb2_grpc, events_pb2, events_pb2_grpc, referral_pb2, referral_pb2_grpc

from bench.run import drop_postgres, percentile, postgres_database, start_service
from referral_service.storage import migrate


async def _measure(port: int, watchers: int, events: int) -> dict[str, float]:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(4)]
    auth = auth_pb2_grpc.AuthServiceStub(channels[0])
    referral = referral_pb2_grpc.ReferralServiceStub(channels[0])
    email = f"bench-{os.getpid()}@example.com"
    await auth.Register(auth_pb2.RegisterRequest(email=email, password="correct horse battery staple"))
    token = (
        await auth.Login(auth_pb2.LoginRequest(email=email, password="correct horse battery staple"))
    ).access_token
    user = (("authorization", f"Bearer {token}"),)
    return await _run(channels, referral, user, watchers, events)


async def _run(
    channels: list[grpc.aio.Channel],
    referral: referral_pb2_grpc.ReferralServiceStub,
    user: tuple[tuple[str, str], ...],
    watchers: int,
    events: int,
) -> dict[str, float]:
    # A service token with events:read (the bench's own service account, made by the CLI).
    token = os.environ["BENCH_EVENTS_TOKEN"]
    reader = (("authorization", f"Bearer {token}"),)
    arrivals: list[dict[str, float]] = [{} for _ in range(watchers)]
    ready = 0
    all_ready = asyncio.Event()

    async def watch(index: int) -> None:
        nonlocal ready
        stub = events_pb2_grpc.EventServiceStub(channels[index % len(channels)])
        call = stub.WatchEvents(events_pb2.WatchEventsRequest(), metadata=reader)
        async for message in call:
            now = time.perf_counter()
            if not message.events and index >= 0 and not all_ready.is_set():
                ready += 1
                if ready == watchers:
                    all_ready.set()
            for event in message.events:
                arrivals[index][event.id] = now

    tasks = [asyncio.ensure_future(watch(i)) for i in range(watchers)]
    await asyncio.wait_for(all_ready.wait(), 60)
    starts: list[float] = []
    call_ms: list[float] = []
    ttl = duration_pb2.Duration(seconds=3600)
    for i in range(events):
        started = time.perf_counter()
        if i % 2 == 0:
            await referral.CreateReferralCode(referral_pb2.CreateReferralCodeRequest(ttl=ttl), metadata=user)
        else:
            await referral.DeleteReferralCode(referral_pb2.DeleteReferralCodeRequest(), metadata=user)
        call_ms.append((time.perf_counter() - started) * 1000)
        starts.append(started)
        await asyncio.sleep(0.02)
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline and any(len(a) < events for a in arrivals):  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    latencies: list[float] = []
    for seen in arrivals:
        ordered = sorted(seen.values())
        latencies += [(arrived - start) * 1000 for arrived, start in zip(ordered, starts, strict=False)]
    received = sum(len(a) for a in arrivals)
    return {
        "watchers": watchers,
        "events": events,
        "deliveries_expected": watchers * events,
        "deliveries_received": received,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "writer_call_p50_ms": percentile(call_ms, 50),
    }


async def _outbox_cost(url: str, rounds: int = 5, per_round: int = 100) -> dict[str, float]:
    """What the outbox adds to Register's transaction on PostgreSQL: the transaction that
    inserts the user, with and without its event (advisory lock, NOTIFY, the event row),
    alternating rounds so that drift hits both alike."""
    from referral_service.domain import events
    from referral_service.domain.clock import utcnow
    from referral_service.domain.ports import NewUser, UnitOfWork
    from referral_service.storage.db import Database
    from referral_service.storage.store import SqlStore

    db = Database(url, pool_size=2, timeout=5)
    store = SqlStore(db)
    timings: dict[bool, list[float]] = {False: [], True: []}
    serial = 0
    for _ in range(rounds):
        for with_event in (False, True):
            for _ in range(per_round):
                serial += 1
                email = f"outbox-{serial}@example.com"

                async def work(uow: UnitOfWork, email: str = email, with_event: bool = with_event) -> None:
                    now = utcnow()
                    user = await uow.users.add(NewUser(email=email, email_key=email, password_hash="x"), now)
                    if with_event:
                        await uow.events.append(events.user_registered(user), now)

                started = time.perf_counter()
                await store.transact(work)
                timings[with_event].append((time.perf_counter() - started) * 1000)
    await db.dispose()
    without, with_ = percentile(timings[False], 50), percentile(timings[True], 50)
    return {"without_ms": without, "with_ms": with_, "added_ms": with_ - without}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--watchers", type=int, default=100)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    url = postgres_database().replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        migrate.upgrade(url)
        with tempfile.TemporaryDirectory() as work:
            server = start_service(Path(work), url, None, "uvloop", REFERRAL_WORKERS=str(args.workers))
            try:
                os.environ["BENCH_EVENTS_TOKEN"] = _service_token(server.port, url, Path(work))
                figures = asyncio.run(_measure(server.port, args.watchers, args.events))
            finally:
                server.stop()
            cost = asyncio.run(_outbox_cost(url))
    finally:
        drop_postgres(url.replace("postgresql+asyncpg://", "postgresql://", 1))
    print("| watchers | events | received / expected | p50 ms | p99 ms | writer call p50 ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(
        f"| {figures['watchers']:.0f} | {figures['events']:.0f} | "
        f"{figures['deliveries_received']:.0f} / {figures['deliveries_expected']:.0f} | "
        f"{figures['p50_ms']:.1f} | {figures['p99_ms']:.1f} | {figures['writer_call_p50_ms']:.1f} |"
    )
    print()
    print("| Register's transaction on PostgreSQL | p50 ms |")
    print("| --- | --- |")
    print(f"| without its event | {cost['without_ms']:.2f} |")
    print(f"| with its event (the outbox) | {cost['with_ms']:.2f} |")
    print(f"| added by the outbox | {cost['added_ms']:.2f} |")


def _service_token(port: int, url: str, work: Path) -> str:
    """A service account with events:read (made directly in the database, as the CLI does)
    and its token."""
    from referral_service.app import build_services
    from referral_service.config import Settings

    async def make() -> str:
        from referral_service.app import build_fast_stores
        from referral_service.storage.db import Database
        from referral_service.storage.store import SqlStore

        settings = Settings(
            _env_file=None, database_url=url, data_dir=work, jwt_secret="bench-secret-" + "b" * 40
        )
        db = Database(url, pool_size=2, timeout=5)
        services = build_services(
            settings, SqlStore(db), build_fast_stores(settings), settings.resolve_jwt_secret()
        )
        account, secret = await services.service_accounts.create(f"bench-{os.getpid()}", ["events:read"])
        await db.dispose()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            response = await auth_pb2_grpc.AuthServiceStub(channel).IssueServiceToken(
                auth_pb2.IssueServiceTokenRequest(client_id=account.client_id, client_secret=secret)
            )
        return response.access_token

    return asyncio.run(make())


if __name__ == "__main__":
    main()
