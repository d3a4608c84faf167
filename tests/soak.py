"""``make soak``: a mixed workload against the real command for a bounded time, with Redis
restarted (a real restart of a redis-server this script owns, which loses every key) and
PostgreSQL "restarted" (every connection dropped and refused for a few seconds by a loopback
proxy, so the shared database server of this machine is not disturbed) once each. Prints calls
made, failures by status, rows expected vs found and the server's RSS sampled through the run.
Exits 1 when a row is missing, a call failed with UNKNOWN/INTERNAL, or RSS keeps growing in
the second half of the run (the first half is warm-up).

    python -m tests.soak --seconds 120 [--workers 12]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from datetime import timedelta
from pathlib import Path

import grpc
from google.protobuf import duration_pb2
from referral.v1 import auth_pb2, auth_pb2_grpc, referral_pb2, referral_pb2_grpc
from sqlalchemy import make_url

from referral_service.config import RateLimitSettings
from referral_service.storage import migrate
from referral_service.storage.db import Database
from tests.invariants import check_invariants, count_rows
from tests.proxy import Proxy

PG_URL = os.environ.get("REFERRAL_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
PASSWORD = "correct horse battery staple"
SECRET = "soak-secret-" + "s" * 40


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def admin(sql: str) -> None:
    import asyncpg

    url = make_url(PG_URL)
    conn = await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username, password=url.password, database=url.database
    )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


class Redis:
    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.process = await asyncio.create_subprocess_exec(
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.workdir), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()


class Load:
    def __init__(
        self, auth: auth_pb2_grpc.AuthServiceStub, referral: referral_pb2_grpc.ReferralServiceStub
    ) -> None:
        self.auth = auth
        self.referral = referral
        self.calls: Counter[str] = Counter()
        self.failures: dict[str, Counter[str]] = defaultdict(Counter)
        self.registrations: dict[str, tuple[str, str]] = {}  # request_id -> (email, code)
        self.registered: set[str] = set()  # request ids that succeeded
        self.accounts: list[str] = []
        self.owners: list[tuple[str, str]] = []  # (email, code)

    async def call(self, name: str, awaitable: object) -> object | None:
        self.calls[name] += 1
        try:
            return await awaitable  # type: ignore[misc]
        except grpc.aio.AioRpcError as error:
            self.failures[name][error.code().name] += 1
            return None

    async def register(self, code: str = "") -> None:
        request_id, email = str(uuid.uuid4()), f"soak-{uuid.uuid4().hex[:12]}@example.com"
        self.registrations[request_id] = (email, code)
        request = auth_pb2.RegisterRequest(
            email=email, password=PASSWORD, referral_code=code, request_id=request_id
        )
        if await self.call("Register", self.auth.Register(request, timeout=10)) is not None:
            self.accounts.append(email)
            self.registered.add(request_id)

    async def session(self) -> None:
        if not self.accounts:
            return await self.register()
        email = random.choice(self.accounts)
        tokens = await self.call(
            "Login", self.auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD), timeout=10)
        )
        if not isinstance(tokens, auth_pb2.LoginResponse):
            return None
        meta = (("authorization", f"Bearer {tokens.access_token}"),)
        await self.call(
            "GetCurrentUser",
            self.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=meta, timeout=10),
        )
        ttl = duration_pb2.Duration()
        ttl.FromTimedelta(timedelta(hours=1))
        created = await self.call(
            "CreateReferralCode",
            self.referral.CreateReferralCode(
                referral_pb2.CreateReferralCodeRequest(ttl=ttl), metadata=meta, timeout=10
            ),
        )
        if isinstance(created, referral_pb2.CreateReferralCodeResponse):
            self.owners.append((email, created.referral_code.code))
        await self.call(
            "RefreshToken",
            self.auth.RefreshToken(
                auth_pb2.RefreshTokenRequest(refresh_token=tokens.refresh_token), timeout=10
            ),
        )
        return None

    async def lookup(self) -> None:
        if not self.owners:
            return
        email, _ = random.choice(self.owners)
        request = referral_pb2.GetReferralCodeByEmailRequest(email=email)
        await self.call("GetReferralCodeByEmail", self.referral.GetReferralCodeByEmail(request, timeout=10))

    async def worker(self, until: float) -> None:
        while time.monotonic() < until:
            roll = random.random()
            if roll < 0.5:
                await self.lookup()
            elif roll < 0.7:
                await self.register()
            elif roll < 0.8 and self.owners:
                await self.register(random.choice(self.owners)[1])
            else:
                await self.session()


async def soak(seconds: float, workers: int) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="referral-soak-"))
    database = f"referral_soak_{uuid.uuid4().hex[:10]}"
    await admin(f'CREATE DATABASE "{database}"')
    db_url = make_url(PG_URL).set(database=database).render_as_string(hide_password=False)
    await migrate.upgrade_async(db_url)
    url = make_url(db_url)
    proxy = await Proxy(url.host or "127.0.0.1", url.port or 5432).start()
    redis = Redis(free_port(), workdir)
    await redis.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFERRAL_")}
    env.update(
        REFERRAL_DATABASE_URL=proxy.database_url(db_url),
        REFERRAL_REDIS_URL=f"redis://127.0.0.1:{redis.port}/0",
        REFERRAL_JWT_SECRET=SECRET,
        REFERRAL_GRPC_PORT="0",
        REFERRAL_HTTP_PORT="0",
        REFERRAL_WORKERS="1",
        REFERRAL_DATA_DIR=str(workdir),
        REFERRAL_DATABASE_TIMEOUT_SECONDS="2",
        REFERRAL_REDIS_BREAKER_RESET_SECONDS="1",
        **{
            f"REFERRAL_{name.upper()}": rate
            for name, rate in RateLimitSettings.every_rate("1000000/1h").items()
        },
        REFERRAL_LOG_LEVEL="INFO",
    )
    log_path = workdir / "server.log"
    with log_path.open("wb") as log_file:
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "referral_service", "serve", env=env, stderr=log_file
        )
    status = 1
    try:
        address = ""
        for _ in range(600):
            match = re.search(r"serving gRPC on ([\d.]+:\d+)", log_path.read_text(errors="replace"))
            if match:
                address = match.group(1)
                break
            await asyncio.sleep(0.1)
        if not address:
            raise RuntimeError("server did not start: " + log_path.read_text()[-2000:])
        status = await drive(address, server.pid, seconds, workers, proxy, redis, db_url)
        server.send_signal(signal.SIGTERM)
        await asyncio.wait_for(server.wait(), timeout=60)
        print(f"server exit code: {server.returncode}")
    finally:
        if server.returncode is None:
            server.kill()
        await redis.stop()
        await proxy.close()
        await admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        shutil.rmtree(workdir, ignore_errors=True)
    return status


async def drive(
    address: str, pid: int, seconds: float, workers: int, proxy: Proxy, redis: Redis, db_url: str
) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        load = Load(auth_pb2_grpc.AuthServiceStub(channel), referral_pb2_grpc.ReferralServiceStub(channel))
        await load.register()
        rss_start = rss_kib(pid)
        started = time.monotonic()
        until = started + seconds

        async def chaos() -> None:
            await asyncio.sleep(seconds / 3)
            print(f"[{time.monotonic() - started:6.1f}s] restarting redis (every key is lost)")
            await redis.stop()
            await asyncio.sleep(1.0)
            await redis.start()
            await asyncio.sleep(seconds / 3)
            elapsed = time.monotonic() - started
            print(f"[{elapsed:6.1f}s] restarting postgresql (connections dropped, 3s refused)")
            proxy.refuse()
            await asyncio.sleep(3.0)
            proxy.restore()

        samples: list[tuple[float, int]] = [(0.0, rss_start)]

        async def sample_rss() -> None:
            every = max(5.0, seconds / 20)
            while time.monotonic() + every < until:
                await asyncio.sleep(every)
                samples.append((time.monotonic() - started, rss_kib(pid)))

        await asyncio.gather(chaos(), sample_rss(), *(load.worker(until) for _ in range(workers)))
        rss_end = rss_kib(pid)
        samples.append((time.monotonic() - started, rss_end))
        # a well-behaved client retries failed registrations with the same request_id
        for request_id, (email, code) in load.registrations.items():
            if request_id in load.registered:
                continue
            request = auth_pb2.RegisterRequest(
                email=email, password=PASSWORD, referral_code=code, request_id=request_id
            )
            if await load.call("Register (retry)", load.auth.Register(request, timeout=10)) is not None:
                load.registered.add(request_id)
    db = Database(db_url)
    try:
        found = await count_rows(db, "users")
        await check_invariants(db)
        invariants = "hold"
    except AssertionError as error:
        invariants = str(error)
    finally:
        await db.dispose()
    expected = len(load.registered)
    total = sum(load.calls.values())
    print(f"\nsoak: {seconds:g}s, {workers} workers, server {address}")
    print(f"calls made: {total}")
    for name in sorted(load.calls):
        failed = load.failures.get(name, Counter())
        detail = ", ".join(f"{code} {count}" for code, count in failed.most_common()) or "none failed"
        print(f"  {name:24s} {load.calls[name]:7d}  failed: {detail}")
    attempted = len(load.registrations)
    print(f"rows (users) expected: {expected}  found: {found}  (registrations attempted: {attempted})")
    print(f"database invariants: {invariants}")
    print(f"server RSS: start {rss_start / 1024:.1f} MiB, end {rss_end / 1024:.1f} MiB")
    print("server RSS over time (MiB): " + ", ".join(f"{t:.0f}s {kib / 1024:.1f}" for t, kib in samples))
    # Warm-up (caches, pools, allocator arenas) fills the first half; a leak keeps growing in
    # the second. Growth there of more than 5% (and 8 MiB) fails the soak.
    halfway = min(samples, key=lambda sample: abs(sample[0] - seconds / 2))[1]
    growth = rss_end - halfway
    growing = growth > 8 * 1024 and growth > halfway * 0.05
    print(
        f"RSS growth over the second half: {growth / 1024:+.1f} MiB "
        f"({100 * growth / halfway:+.1f}%): {'GROWING' if growing else 'flat'}"
    )
    broken = sum(c[k] for c in load.failures.values() for k in ("UNKNOWN", "INTERNAL", "DATA_LOSS"))
    return 0 if found == expected and invariants == "hold" and broken == 0 and not growing else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--workers", type=int, default=12)
    args = parser.parse_args()
    return asyncio.run(soak(args.seconds, args.workers))


if __name__ == "__main__":
    raise SystemExit(main())
