"""Benchmark harness: the real service against a bare grpc.aio echo server, same run, same machine.

    python -m bench.run            # short mode (< 2 minutes)
    python -m bench.run --full     # full mode (1,000,000 referrals, longer runs, 5-minute soak)

Load comes from h2load (Debian's nghttp2-client), a separate C process that sends prepared gRPC
frames, so the load generator costs far less CPU per call than the server it measures. Scenarios
that need a different request per call (Register, the mixed workload) use a multi-process
grpc.aio client instead. The cached look-up is also loaded as HTTP/JSON (``h2load --h1`` on the
gateway's port, same service process), and the server CPU per HTTP request is compared with the
gRPC call's and with the predecessor FastAPI service's (a recorded constant). For every scenario the harness reads the server's CPU time and peak RSS
from /proc, computes p50/p99 from h2load's per-request log, prints a Markdown table and writes
JSON next to it (bench/results/); each run is also kept as its own JSON file with the machine's
description (bench/results/runs/) and drawn as PNG charts (bench/results/charts/, bench/charts.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import platform
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
SECRET = "bench-secret-" + "b" * 40
PASSWORD = "correct horse battery staple"
TICKS = os.sysconf("SC_CLK_TCK")
#: Server CPU per request of the predecessor FastAPI service's cached look-up by email, measured
#: on this machine when the gRPC service replaced it (a recorded constant: that service is gone).
FASTAPI_US_PER_REQUEST = 2300
#: Target: an HTTP/JSON look-up costs the server at most this many times a gRPC one.
HTTP_VS_GRPC_TARGET = 2.0


# --- helpers -------------------------------------------------------------------------------------


def generous_rate_limits(value: str) -> dict[str, str]:
    """Every rate limit at ``value``: they stay on (their cost is part of a call) but far above
    the load, since one load generator on 127.0.0.1 would otherwise be throttled like an attacker."""
    from referral_service.config import RateLimitSettings

    return {f"REFERRAL_{name.upper()}": rate for name, rate in RateLimitSettings.every_rate(value).items()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def proc_tree(pid: int) -> list[int]:
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                pids.append(int(entry.name))
    return pids


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / TICKS


def rss_mb(pids: list[int], key: str = "VmRSS") -> float:
    """The largest figure among the server's processes: per worker, not summed (a multi-worker
    parent is a small supervisor)."""
    largest = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    largest = max(largest, int(line.split()[1]))
        except OSError:
            continue
    return largest / 1024


def pss_mb(pids: list[int]) -> float:
    """Proportional set size of the largest process: shared pages (the interpreter, grpc's and
    the other extension modules' code) divided among the processes that map them."""
    largest = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    largest = max(largest, int(line.split()[1]))
        except OSError:
            continue
    return largest / 1024


def redis_cpu_seconds() -> float:
    """CPU time the Redis server has used (user + system), from INFO."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        info = client.info("cpu")
    finally:
        client.close()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def grpc_frame(message: Any) -> bytes:
    body = message.SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


class Server:
    """A server subprocess: the service (``referral-service serve``) or the echo baseline."""

    def __init__(self, argv: list[str], env: dict[str, str], port: int, workdir: Path, cwd: Path) -> None:
        self.port = port
        self.env = env
        self.cwd = cwd
        self.http_port = int(env["REFERRAL_HTTP_PORT"]) if env.get("REFERRAL_HTTP_PORT") else None
        self.uses_redis = bool(env.get("REFERRAL_REDIS_URL"))
        self.log = workdir / f"server-{port}.log"
        with self.log.open("w") as sink:
            self.process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT)
        try:
            wait_port(port)
        except RuntimeError:
            self.process.kill()
            raise RuntimeError(f"server did not start:\n{self.log.read_text()[-3000:]}") from None
        time.sleep(0.5 if "--workers" not in argv else 2.0)  # let every worker bind

    def log_size(self) -> int:
        return self.log.stat().st_size

    def durations(self, method: str, offset: int) -> list[float]:
        """Server-side call durations of ``method`` from the access log written after ``offset``."""
        return [duration for duration, _ in self.calls(method, offset)]

    def calls(self, method: str, offset: int) -> list[tuple[float, str]]:
        """(duration in ms, status code) of each call of ``method`` in the access log after
        ``offset``: h2load sees HTTP 200 for every gRPC call, the status is in the trailers."""
        values = []
        with self.log.open("rb") as handle:
            handle.seek(offset)
            for line in handle.read().decode(errors="replace").splitlines():
                if f"method={method} " in line and "duration_ms=" in line:
                    code = line.split(" code=", 1)[1].split()[0] if " code=" in line else "?"
                    values.append((float(line.split("duration_ms=", 1)[1].split()[0]), code))
        return values

    @property
    def pids(self) -> list[int]:
        """The server process and its children (a multi-worker parent's workers)."""
        return proc_tree(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_echo(workdir: Path, loop: str) -> Server:
    port = free_port()
    return Server(
        [sys.executable, "-m", "bench.echo", str(port), loop], dict(os.environ), port, workdir, ROOT
    )


def _other_port(taken: int) -> int:
    """A free port other than ``taken`` (the kernel may hand out a just-released port again)."""
    while (port := free_port()) == taken:
        pass
    return port


def start_service(workdir: Path, database_url: str, redis_url: str | None, loop: str, **env: str) -> Server:
    port = free_port()
    variables = {k: v for k, v in os.environ.items() if not k.startswith("REFERRAL_")}
    variables.update(
        {
            "REFERRAL_GRPC_PORT": str(port),
            "REFERRAL_HTTP_PORT": str(_other_port(port)),
            "REFERRAL_DATABASE_URL": database_url,
            "REFERRAL_DATA_DIR": str(workdir),
            "REFERRAL_JWT_SECRET": SECRET,
            "REFERRAL_LOG_LEVEL": "INFO",  # the access log is part of the cost of a call
            "REFERRAL_EVENT_LOOP": loop,
            "REFERRAL_WORKERS": "1",
            "REFERRAL_REDIS_KEY_PREFIX": f"bench:{os.getpid()}:{port}:",
            **generous_rate_limits("1000000000/1h"),
            # The Login scenario opens a session per call: with the default cap (20 per user)
            # the token the other scenarios use would be revoked as the oldest session.
            "REFERRAL_MAX_SESSIONS_PER_USER": "10000",
        }
    )
    if redis_url:
        variables["REFERRAL_REDIS_URL"] = redis_url
    variables.update(env)
    argv = [sys.executable, "-m", "referral_service", "serve"]
    if variables["REFERRAL_WORKERS"] != "1":
        argv += ["--workers", variables["REFERRAL_WORKERS"]]
    return Server(argv, variables, port, workdir, workdir)


# --- load ---------------------------------------------------------------------------------------


@dataclass
class Result:
    scenario: str
    stack: str
    requests: int
    failed: int
    rps: float
    p50_ms: float
    p99_ms: float
    server_cpu_us_per_call: float
    server_peak_rss_mb: float
    loadgen_cpu_percent: float
    server_p50_ms: float = float("nan")
    #: CPU the Redis server spent per call (NaN when the stack has no Redis)
    redis_cpu_us_per_call: float = float("nan")
    notes: str = ""
    ratios: dict[str, float] = field(default_factory=dict)


def h2load(
    server: Server,
    path: str,
    message: Any,
    *,
    duration: float,
    clients: int,
    streams: int,
    scenario: str,
    stack: str,
    headers: tuple[str, ...] = (),
    warmup: int = 1,
    http_method: str | None = None,
) -> Result:
    """gRPC calls of ``path`` with ``message``; or, with ``http_method`` (the RPC the request
    runs, for the server's access log), plain HTTP/1.1 GETs of ``path`` on the HTTP port."""
    with tempfile.TemporaryDirectory() as tmp:
        log_file = Path(tmp) / "log"
        argv = [
            "h2load",
            f"-c{clients}",
            f"-m{streams}",
            "-t1",
            f"-D{int(duration)}",
            f"--warm-up-time={int(warmup)}",
            f"--log-file={log_file}",
        ]
        if http_method is None:
            body = Path(tmp) / "body"
            body.write_bytes(grpc_frame(message))
            argv += ["-H", "content-type: application/grpc", "-H", "te: trailers", "-d", str(body)]
        else:
            argv.append("--h1")
        for header in headers:
            argv += ["-H", header]
        if http_method is None:
            argv.append(f"http://127.0.0.1:{server.port}{path}")
        else:
            argv.append(f"http://127.0.0.1:{server.http_port}{path}")
        pids = server.pids
        log_offset = server.log_size()
        cpu_before = cpu_seconds(pids)
        redis_before = redis_cpu_seconds() if server.uses_redis else 0.0
        started = time.monotonic()
        usage_before = os.times()
        output = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        usage_after = os.times()
        elapsed = time.monotonic() - started
        cpu_after = cpu_seconds(pids)
        redis_after = redis_cpu_seconds() if server.uses_redis else 0.0
        latencies = []
        failed = 0
        for line in log_file.read_text().splitlines():
            _start, status, micros = line.split("\t")
            latencies.append(int(micros) / 1000)
            if status != "200":
                failed += 1
    done = len(latencies)
    rps = 0.0
    for line in output.splitlines():
        if line.startswith("finished in"):
            rps = float(line.split(",")[1].split()[0])
    loadgen = (usage_after.children_user + usage_after.children_system) - (
        usage_before.children_user + usage_before.children_system
    )
    calls = max(done + int(rps * warmup), 1)
    return Result(
        scenario=scenario,
        stack=stack,
        requests=done,
        failed=failed,
        rps=rps,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        # CPU is read around the whole run (warm-up included), so divide by every call made
        server_cpu_us_per_call=(cpu_after - cpu_before) * 1e6 / calls,
        redis_cpu_us_per_call=(redis_after - redis_before) * 1e6 / calls
        if server.uses_redis
        else float("nan"),
        server_peak_rss_mb=rss_mb(pids, "VmHWM"),
        loadgen_cpu_percent=100 * loadgen / elapsed,
        server_p50_ms=percentile(server.durations(http_method or path, log_offset), 50),
        notes=_status_note(server.calls(http_method or path, log_offset)),
    )


def _status_note(calls: list[tuple[float, str]]) -> str:
    """Every gRPC status other than OK the server logged during the run (it must be none)."""
    codes: dict[str, int] = {}
    for _, code in calls:
        if code != "OK":
            codes[code] = codes.get(code, 0) + 1
    return ", ".join(f"{n} {code}" for code, n in sorted(codes.items()))


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


# --- a python client for scenarios that need a distinct request per call --------------------------


def _client_worker(args: tuple[str, str, float, int, int, str]) -> tuple[list[float], int]:
    target, scenario, duration, concurrency, seed, extra = args
    return asyncio.run(_client_loop(target, scenario, duration, concurrency, seed, extra))


async def _client_loop(
    target: str, scenario: str, duration: float, concurrency: int, seed: int, extra: str
) -> tuple[list[float], int]:
    import grpc
    from referral.v1 import auth_pb2, auth_pb2_grpc, referral_pb2, referral_pb2_grpc

    data = json.loads(extra)
    latencies: list[float] = []
    failures = 0
    counter = 0
    deadline = time.monotonic() + duration
    async with grpc.aio.insecure_channel(target) as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        referral = referral_pb2_grpc.ReferralServiceStub(channel)
        metadata = (("authorization", f"Bearer {data['token']}"),)

        async def one() -> None:
            nonlocal counter, failures
            while time.monotonic() < deadline:
                counter += 1
                n = counter
                started = time.perf_counter()
                try:
                    if scenario == "conversion":
                        # A distinct referee per call (first conversion: qualifies and rewards).
                        span = data["last_id"] - data["first_id"] + 1
                        user_id = data["first_id"] + (n * 7919 + seed * 104_729) % span
                        await referral.RecordConversion(
                            referral_pb2.RecordConversionRequest(
                                user_id=user_id, event_id=f"b{seed}-{n}-{os.getpid()}", kind="purchase"
                            ),
                            metadata=(("authorization", f"Bearer {data['service_token']}"),),
                        )
                    elif scenario == "register":
                        await auth.Register(
                            auth_pb2.RegisterRequest(
                                email=f"r{seed}-{n}-{os.getpid()}@bench.example",
                                password=PASSWORD,
                                referral_code=data["code"],
                            )
                        )
                    else:  # mixed: 80% cached look-ups, 10% list, 5% who-am-I, 5% login
                        pick = n % 20
                        if pick < 16:
                            await referral.GetReferralCodeByEmail(
                                referral_pb2.GetReferralCodeByEmailRequest(email=data["email"])
                            )
                        elif pick < 18:
                            await referral.ListReferrals(
                                referral_pb2.ListReferralsRequest(referrer_id=data["owner_id"], page_size=20),
                                metadata=metadata,
                            )
                        elif pick < 19:
                            await auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=metadata)
                        else:
                            await auth.Login(auth_pb2.LoginRequest(email=data["email"], password=PASSWORD))
                except grpc.aio.AioRpcError:
                    failures += 1
                latencies.append((time.perf_counter() - started) * 1000)

        await asyncio.gather(*(one() for _ in range(concurrency)))
    return latencies, failures


def python_load(
    server: Server,
    scenario: str,
    stack: str,
    duration: float,
    processes: int,
    concurrency: int,
    extra: dict[str, Any],
) -> Result:
    pids = server.pids
    log_offset = server.log_size()
    cpu_before = cpu_seconds(pids)
    started = time.monotonic()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        outcomes = pool.map(
            _client_worker,
            [
                (f"127.0.0.1:{server.port}", scenario, duration, concurrency, i, json.dumps(extra))
                for i in range(processes)
            ],
        )
    elapsed = time.monotonic() - started
    cpu_after = cpu_seconds(pids)
    latencies = [value for values, _ in outcomes for value in values]
    failed = sum(f for _, f in outcomes)
    return Result(
        scenario=scenario,
        stack=stack,
        requests=len(latencies),
        failed=failed,
        rps=len(latencies) / duration,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        server_cpu_us_per_call=(cpu_after - cpu_before) * 1e6 / max(len(latencies), 1),
        server_peak_rss_mb=rss_mb(pids, "VmHWM"),
        loadgen_cpu_percent=float("nan"),
        server_p50_ms=percentile(
            server.durations("/referral.v1.AuthService/Register", log_offset)
            if scenario == "register"
            else server.durations("/referral.v1.ReferralService/RecordConversion", log_offset)
            if scenario == "conversion"
            else [
                d
                for m in ("GetReferralCodeByEmail", "ListReferrals", "GetCurrentUser", "Login")
                for d in server.durations(
                    f"/referral.v1.{'AuthService' if m in ('GetCurrentUser', 'Login') else 'ReferralService'}/{m}",
                    log_offset,
                )
            ],
            50,
        ),
        notes=f"python client, {processes} processes x {concurrency}; wall {elapsed:.1f}s",
    )


# --- data ----------------------------------------------------------------------------------------


async def seed_service(target: str, email: str) -> dict[str, Any]:
    """A referrer with a live code, through the API."""
    import grpc
    from google.protobuf import duration_pb2
    from referral.v1 import auth_pb2, auth_pb2_grpc, referral_pb2, referral_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        referral = referral_pb2_grpc.ReferralServiceStub(channel)
        user = (await auth.Register(auth_pb2.RegisterRequest(email=email, password=PASSWORD))).user
        tokens = await auth.Login(auth_pb2.LoginRequest(email=email, password=PASSWORD))
        ttl = duration_pb2.Duration()
        ttl.FromTimedelta(timedelta(days=30))
        metadata = (("authorization", f"Bearer {tokens.access_token}"),)
        code = await referral.CreateReferralCode(
            referral_pb2.CreateReferralCodeRequest(ttl=ttl), metadata=metadata
        )
        found = await referral.GetReferralCodeByEmail(referral_pb2.GetReferralCodeByEmailRequest(email=email))
        assert found.referral_code.code == code.referral_code.code
        return {
            "owner_id": user.id,
            "token": tokens.access_token,
            "code": code.referral_code.code,
            "email": email,
        }


#: The programme of the RecordConversion scenario: no caps, and a velocity threshold above the
#: seeded referrals (all made in one second), so that every first conversion rewards both sides.
BENCH_RULES = """
[program]
id = "bench"
qualifying_kinds = ["purchase"]
hold_seconds = 86400
referrer_reward = { amount = 1000, unit = "USD" }
referee_reward = { amount = 500, unit = "USD" }
velocity_per_hour = 1000000
"""


def seed_conversions(server: Server, database_url: str, owner_id: int) -> dict[str, Any]:
    """The seeded referees made verified (SQL), and a service token with conversions:write
    (the CLI with the server's environment, then IssueServiceToken)."""
    created = subprocess.run(
        [
            sys.executable,
            "-m",
            "referral_service",
            "create-service-account",
            f"bench-billing-{server.port}",
            "--scope",
            "conversions:write",
            "--json",
        ],
        env=server.env,
        cwd=server.cwd,
        check=True,
        capture_output=True,
        text=True,
    )
    account = json.loads(created.stdout.strip().splitlines()[-1])
    return asyncio.run(_seed_conversions(server, database_url, owner_id, account))


async def _seed_conversions(
    server: Server, database_url: str, owner_id: int, account: dict[str, str]
) -> dict[str, Any]:
    import grpc
    from referral.v1 import auth_pb2, auth_pb2_grpc
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(database_url)
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE users SET is_verified = true WHERE referrer_id = :o"), {"o": owner_id}
        )
        first, last = (
            await conn.execute(
                text("SELECT min(id), max(id) FROM users WHERE referrer_id = :o"), {"o": owner_id}
            )
        ).one()
    await engine.dispose()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        issued = await auth_pb2_grpc.AuthServiceStub(channel).IssueServiceToken(
            auth_pb2.IssueServiceTokenRequest(
                client_id=account["client_id"], client_secret=account["client_secret"]
            )
        )
    return {"first_id": int(first), "last_id": int(last), "service_token": issued.access_token}


def seed_referrals_sqlite(path: Path, owner_id: int, count: int) -> None:
    now = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ")
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    batch = 50_000
    for start in range(0, count, batch):
        db.executemany(
            "INSERT INTO users (email, email_key, password_hash, is_active, is_verified, is_superuser,"
            " referrer_id, referral_count, create_time, update_time) VALUES (?, ?, 'x', 1, 0, 0, ?, 0, ?, ?)",
            [
                (f"ref{i}@bench.example", f"ref{i}@bench.example", owner_id, now, now)
                for i in range(start, min(start + batch, count))
            ],
        )
    db.execute("UPDATE users SET referral_count = referral_count + ? WHERE id = ?", (count, owner_id))
    db.commit()
    db.execute("ANALYZE")
    db.close()


async def seed_referrals_postgres(url: str, owner_id: int, count: int) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    now = datetime.now(UTC)
    await conn.copy_records_to_table(
        "users",
        columns=[
            "email",
            "email_key",
            "password_hash",
            "is_active",
            "is_verified",
            "is_superuser",
            "referrer_id",
            "referral_count",
            "create_time",
            "update_time",
        ],
        records=(
            (f"ref{i}@bench.example", f"ref{i}@bench.example", "x", True, False, False, owner_id, 0, now, now)
            for i in range(count)
        ),
    )
    await conn.execute("UPDATE users SET referral_count = referral_count + $1 WHERE id = $2", count, owner_id)
    await conn.execute("ANALYZE users")
    await conn.close()


async def referral_ids(database_url: str, owner_id: int, offset: int) -> int:
    """The id after which page ``offset / page_size`` starts."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(database_url)
    async with engine.connect() as conn:
        value = (
            await conn.execute(
                text("SELECT id FROM users WHERE referrer_id = :o ORDER BY id LIMIT 1 OFFSET :n"),
                {"o": owner_id, "n": offset - 1},
            )
        ).scalar_one()
    await engine.dispose()
    return int(value)


def page_token(referrer_id: int, after_id: int) -> str:
    from referral_service.domain.referrals import ReferralService

    service = ReferralService(
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        page_secret=SECRET.encode(),
        max_horizon=timedelta(days=1),
        cache_ttl=timedelta(seconds=1),
        negative_cache_ttl=timedelta(seconds=1),
        default_page_size=50,
        max_page_size=1000,
        request_id_ttl=timedelta(days=1),
    )
    return service._page_token(referrer_id, after_id)


def argon2_ceiling(seconds: float) -> float:
    """Raw argon2id verifies per second on all cores, with the service's default parameters."""
    from concurrent.futures import ThreadPoolExecutor

    from argon2 import PasswordHasher

    hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
    stored = hasher.hash(PASSWORD)
    cores = os.cpu_count() or 1
    deadline = time.monotonic() + seconds
    counts = [0] * cores

    def spin(index: int) -> None:
        while time.monotonic() < deadline:
            hasher.verify(stored, PASSWORD)
            counts[index] += 1

    started = time.monotonic()
    with ThreadPoolExecutor(cores) as pool:
        list(pool.map(spin, range(cores)))
    return sum(counts) / (time.monotonic() - started)


# --- the run -------------------------------------------------------------------------------------


def postgres_database() -> str:
    import asyncpg

    name = f"referral_bench_{os.getpid()}"

    async def create() -> None:
        conn = await asyncpg.connect(PG_ADMIN)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
        await conn.close()

    asyncio.run(create())
    return PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"


def drop_postgres(url: str) -> None:
    import asyncpg

    name = url.rsplit("/", 1)[1]

    async def drop() -> None:
        conn = await asyncpg.connect(PG_ADMIN)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()

    asyncio.run(drop())


def run(args: argparse.Namespace) -> dict[str, Any]:
    from referral.v1 import auth_pb2, referral_pb2

    from referral_service.storage import migrate

    full = args.full
    duration = 10.0 if full else 3.0
    referrals = 1_000_000 if full else 100_000
    loop = args.loop
    results: list[Result] = []
    meta: dict[str, Any] = {
        "mode": "full" if full else "short",
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "event_loop": loop,
        "duration_s": duration,
        "referrals_seeded": referrals,
    }
    work = Path(tempfile.mkdtemp(prefix="referral-bench-"))
    baseline, echo_idle_rss = echo_run(work, loop, duration, "bare grpc.aio")
    results.append(baseline)
    #: The echo run each result is compared with: the one made just before its stack's scenarios
    #: (this VM drifts by 10-15% over minutes; a ceiling measured minutes earlier skews ratios).
    ceilings: dict[str, Result] = {}

    stacks = [("sqlite", "memory"), ("sqlite", "redis"), ("postgres", "memory"), ("postgres", "redis")]
    if not full:
        stacks = [("sqlite", "memory"), ("postgres", "redis")]
    argon2_rate = argon2_ceiling(3.0 if not full else 10.0)
    meta["argon2_verifies_per_s_all_cores"] = round(argon2_rate, 1)
    print(f"argon2 alone: {argon2_rate:.1f} verifies/s on {os.cpu_count()} cores", flush=True)

    for database, cache in stacks:
        stack = f"{database}+{cache}"
        ceilings[stack], _ = echo_run(work, loop, duration, f"bare grpc.aio, before {stack}")
        results.append(ceilings[stack])
        stack_argon2 = argon2_ceiling(3.0 if not full else 10.0)
        meta[f"argon2_verifies_per_s[{stack}]"] = round(stack_argon2, 1)
        pg_url = None
        if database == "postgres":
            pg_url = postgres_database()
            db_url = pg_url.replace("postgresql://", "postgresql+asyncpg://")
        else:
            db_url = f"sqlite+aiosqlite:///{work / f'{stack}.db'}"
        migrate.upgrade(db_url)
        rules = work / "rewards.toml"
        rules.write_text(BENCH_RULES)
        service = start_service(
            work,
            db_url,
            REDIS_URL if cache == "redis" else None,
            loop,
            REFERRAL_REWARDS_RULES_FILE=str(rules),
        )
        try:
            target = f"127.0.0.1:{service.port}"
            meta[f"idle_rss_mb[{stack}]"] = round(rss_mb(service.pids), 1)
            data = asyncio.run(seed_service(target, "alice@bench.example"))
            lookup = referral_pb2.GetReferralCodeByEmailRequest(email="alice@bench.example")
            path = "/referral.v1.ReferralService/GetReferralCodeByEmail"
            results.append(
                h2load(
                    service,
                    path,
                    lookup,
                    duration=duration,
                    clients=4,
                    streams=16,
                    scenario="GetReferralCodeByEmail, cache hit",
                    stack=stack,
                )
            )
            print(results[-1], flush=True)
            grpc_lookup = results[-1]
            # the same look-up as HTTP/JSON, same service process (HTTP/1.1: uvicorn has no h2c)
            results.append(
                h2load(
                    service,
                    "/v1/referral-codes/by-email/alice@bench.example",
                    None,
                    duration=duration,
                    clients=32,
                    streams=1,
                    scenario="GET /v1/referral-codes/by-email/{email} (HTTP/JSON), cache hit",
                    stack=stack,
                    http_method=path,
                )
            )
            http_ratio = results[-1].server_cpu_us_per_call / max(grpc_lookup.server_cpu_us_per_call, 1e-9)
            results[-1].ratios["cpu_vs_grpc"] = round(http_ratio, 2)
            results[-1].ratios["cpu_vs_fastapi"] = round(
                results[-1].server_cpu_us_per_call / FASTAPI_US_PER_REQUEST, 2
            )
            meta[f"http_vs_grpc[{stack}]"] = {
                "grpc_us": round(grpc_lookup.server_cpu_us_per_call),
                "http_us": round(results[-1].server_cpu_us_per_call),
                "ratio": round(http_ratio, 2),
            }
            print(results[-1], flush=True)
            print(_http_summary(stack, meta[f"http_vs_grpc[{stack}]"]), flush=True)
            login = auth_pb2.LoginRequest(email="alice@bench.example", password=PASSWORD)
            results.append(
                h2load(
                    service,
                    "/referral.v1.AuthService/Login",
                    login,
                    duration=duration,
                    clients=2,
                    streams=8,
                    scenario="Login",
                    stack=stack,
                )
            )
            results[-1].ratios["vs_raw_argon2"] = round(results[-1].rps / stack_argon2, 3)
            print(results[-1], flush=True)
            # lookups while logins saturate the hashing pool
            background = subprocess.Popen(
                [
                    "h2load",
                    "-c2",
                    "-m16",
                    f"-D{int(duration) + 2}",
                    "-H",
                    "content-type: application/grpc",
                    "-H",
                    "te: trailers",
                    "-d",
                    _frame_file(work, login),
                    f"http://{target}/referral.v1.AuthService/Login",
                ],
                stdout=subprocess.DEVNULL,
            )
            time.sleep(1.0)
            contended = h2load(
                service,
                path,
                lookup,
                duration=duration,
                clients=1,
                streams=4,
                scenario="GetReferralCodeByEmail while logins saturate",
                stack=stack,
                warmup=1,
            )
            background.wait()
            results.append(contended)
            print(results[-1], flush=True)
            results.append(
                python_load(service, "register", stack, duration, processes=2, concurrency=8, extra=data)
            )
            results[-1].scenario = "Register with a referral code"
            print(results[-1], flush=True)
            # ListReferrals over a referrer with many referrals
            if database == "sqlite":
                seed_referrals_sqlite(work / f"{stack}.db", data["owner_id"], referrals)
            else:
                assert pg_url is not None
                asyncio.run(seed_referrals_postgres(pg_url, data["owner_id"], referrals))
            metadata = (f"authorization: Bearer {data['token']}",)
            first = referral_pb2.ListReferralsRequest(referrer_id=data["owner_id"], page_size=100)
            results.append(
                h2load(
                    service,
                    "/referral.v1.ReferralService/ListReferrals",
                    first,
                    duration=duration,
                    clients=1,
                    streams=1,
                    scenario="ListReferrals, page 1 of 100",
                    stack=stack,
                    headers=metadata,
                )
            )
            print(results[-1], flush=True)
            deep_page = min(5000, referrals // 100 - 1)
            after = asyncio.run(referral_ids(db_url, data["owner_id"], deep_page * 100))
            deep = referral_pb2.ListReferralsRequest(
                referrer_id=data["owner_id"], page_size=100, page_token=page_token(data["owner_id"], after)
            )
            results.append(
                h2load(
                    service,
                    "/referral.v1.ReferralService/ListReferrals",
                    deep,
                    duration=duration,
                    clients=1,
                    streams=1,
                    scenario=f"ListReferrals, page {deep_page + 1} of 100",
                    stack=stack,
                    headers=metadata,
                )
            )
            print(results[-1], flush=True)
            conversions = seed_conversions(service, db_url, data["owner_id"])
            results.append(
                python_load(
                    service,
                    "conversion",
                    stack,
                    duration,
                    processes=2,
                    concurrency=8,
                    extra={**data, **conversions},
                )
            )
            results[-1].scenario = "RecordConversion (each qualifies a referee: two held rewards)"
            print(results[-1], flush=True)
            results.append(
                python_load(service, "mixed", stack, duration, processes=2, concurrency=8, extra=data)
            )
            results[-1].scenario = "mixed (80% look-up, 10% list, 5% me, 5% login)"
            print(results[-1], flush=True)
        finally:
            service.stop()
        redis_url = REDIS_URL if cache == "redis" else None
        # cache miss: every look-up reads the database
        results.append(
            lookup_run(
                work,
                db_url,
                redis_url,
                loop,
                duration,
                stack,
                "cache miss",
                REFERRAL_CODE_CACHE_TTL="0",
                REFERRAL_CODE_NEGATIVE_CACHE_TTL="0",
            )
        )
        if cache == "redis":
            scaling = []
            for workers in ("1", "2"):
                results.append(
                    lookup_run(
                        work,
                        db_url,
                        redis_url,
                        loop,
                        duration,
                        stack,
                        f"cache hit, {workers} worker(s)",
                        idle=meta.setdefault(f"idle_per_worker[{stack}, {workers} worker(s)]", {}),
                        REFERRAL_WORKERS=workers,
                    )
                )
                scaling.append(results[-1])
            meta[f"workers[{stack}]"] = worker_scaling(*scaling)
        if pg_url:
            drop_postgres(pg_url)

    for result in results:
        ceiling = ceilings.get(result.stack, baseline)
        result.ratios["rps_vs_echo"] = round(result.rps / ceiling.rps, 3) if ceiling.rps else 0.0
        result.ratios["cpu_vs_echo"] = (
            round(result.server_cpu_us_per_call / ceiling.server_cpu_us_per_call, 2)
            if ceiling.server_cpu_us_per_call
            else 0.0
        )
    meta["echo_idle_rss_mb"] = round(echo_idle_rss, 1)
    shutil.rmtree(work, ignore_errors=True)
    return {"meta": meta, "results": [asdict(r) for r in results]}


def echo_run(work: Path, loop: str, duration: float, stack: str) -> tuple[Result, float]:
    """Start the echo server, measure it like the service's look-ups, stop it; also its idle RSS."""
    from referral.v1 import referral_pb2

    echo = start_echo(work, loop)
    try:
        idle = rss_mb(echo.pids)
        result = h2load(
            echo,
            "/bench.Echo/Echo",
            referral_pb2.GetReferralCodeByEmailRequest(email="alice@bench.example"),
            duration=duration,
            clients=4,
            streams=16,
            scenario="echo (ceiling)",
            stack=stack,
        )
    finally:
        echo.stop()
    print(
        f"echo ({stack}): {result.rps:.0f} calls/s, {result.server_cpu_us_per_call:.0f} us CPU/call",
        flush=True,
    )
    return result, idle


def lookup_run(
    work: Path,
    db_url: str,
    redis_url: str | None,
    loop: str,
    duration: float,
    stack: str,
    label: str,
    idle: dict[str, float] | None = None,
    **env: str,
) -> Result:
    """Start a service with ``env``, load cached look-ups of the seeded referrer, stop it;
    ``idle`` receives the idle RSS and PSS of the largest worker."""
    from referral.v1 import referral_pb2

    service = start_service(work, db_url, redis_url, loop, **env)
    try:
        if idle is not None:
            idle["rss_mb"] = round(rss_mb(service.pids), 1)
            idle["pss_mb"] = round(pss_mb(service.pids), 1)
        workers = [pid for pid in service.pids if pid != service.process.pid] or service.pids
        before = [cpu_seconds([pid]) for pid in workers]
        # 16 connections x 4 streams (the same 64 calls in flight as elsewhere): SO_REUSEPORT
        # spreads connections, not calls, over the workers, and 4 connections can land 3:1.
        result = h2load(
            service,
            "/referral.v1.ReferralService/GetReferralCodeByEmail",
            referral_pb2.GetReferralCodeByEmailRequest(email="alice@bench.example"),
            duration=duration,
            clients=16,
            streams=4,
            scenario=f"GetReferralCodeByEmail, {label}",
            stack=stack,
        )
        if len(workers) > 1:
            used = [cpu_seconds([pid]) - b for pid, b in zip(workers, before, strict=True)]
            shares = [100 * u / max(sum(used), 1e-9) for u in used]
            split = "/".join(f"{share:.0f}" for share in shares if share >= 1)  # not the supervisor
            result.notes = ", ".join(filter(None, [result.notes, f"CPU split over workers {split}%"]))
    finally:
        service.stop()
    print(result, flush=True)
    return result


def worker_scaling(one: Result, two: Result) -> dict[str, float]:
    """How two workers compare with one, and whether the machine, not the service, set the
    limit: each call costs the server, Redis and h2load some CPU; with every core busy, calls/s
    cannot pass cores / (their sum)."""
    figures: dict[str, float] = {"ratio": round(two.rps / one.rps, 2) if one.rps else 0.0}
    for name, result in (("1", one), ("2", two)):
        loadgen_us = result.loadgen_cpu_percent / 100 / result.rps * 1e6 if result.rps else 0.0
        redis_us = 0.0 if math.isnan(result.redis_cpu_us_per_call) else result.redis_cpu_us_per_call
        total = result.server_cpu_us_per_call + redis_us + loadgen_us
        bound = (os.cpu_count() or 1) * 1e6 / total if total else 0.0
        figures[f"cpu_us_per_call_all[{name}]"] = round(total)
        figures[f"machine_bound_rps[{name}]"] = round(bound)
        figures[f"share_of_bound[{name}]"] = round(result.rps / bound, 2) if bound else 0.0
    return figures


def _http_summary(stack: str, figures: dict[str, float]) -> str:
    met = "met" if figures["ratio"] <= HTTP_VS_GRPC_TARGET else "NOT met"
    return (
        f"HTTP/JSON vs gRPC, cached look-up by email ({stack}): server CPU {figures['http_us']:.0f} us "
        f"per HTTP request vs {figures['grpc_us']:.0f} us per gRPC call = {figures['ratio']:.2f}x "
        f"(target <= {HTTP_VS_GRPC_TARGET:g}x: {met}); vs the predecessor FastAPI service's "
        f"~{FASTAPI_US_PER_REQUEST:,} us per request (a recorded constant, measured on this machine "
        f"earlier, not in this run): {figures['http_us'] / FASTAPI_US_PER_REQUEST:.2f}x."
    )


def _frame_file(work: Path, message: Any) -> str:
    path = work / f"frame-{time.monotonic_ns()}"
    path.write_bytes(grpc_frame(message))
    return str(path)


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        f"Mode {meta['mode']}, {meta['cores']} cores, Python {meta['python']}, loop {meta['event_loop']}, "
        f"{meta['duration_s']:g}s per scenario, {meta['time']}.",
        f"argon2id alone: {meta['argon2_verifies_per_s_all_cores']} verifies/s on all cores at the start; "
        + ", ".join(
            f"{k.split('[')[1][:-1]} {v}" for k, v in meta.items() if k.startswith("argon2_verifies_per_s[")
        )
        + " (measured before each stack; Login is compared with its stack's figure).",
        "Ratios to echo use the echo run made just before each stack (the rows 'before ...').",
        "",
        "| scenario | stack | calls/s | vs echo | p50 ms | p99 ms | server p50 ms | server CPU us/call | CPU vs echo | peak RSS MB | failed |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["results"]:
        extra = "".join(
            f" ({k} {v})" for k, v in r["ratios"].items() if k not in ("rps_vs_echo", "cpu_vs_echo")
        )
        lines.append(
            f"| {r['scenario']}{extra} | {r['stack']} | {r['rps']:.0f} | {r['ratios']['rps_vs_echo']:.2f} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['server_p50_ms']:.2f} | {r['server_cpu_us_per_call']:.0f} | "
            f"{r['ratios']['cpu_vs_echo']:.2f} | {r['server_peak_rss_mb']:.0f} | {r['failed']}"
            f"{' (' + r['notes'] + ')' if r['notes'] and 'python client' not in r['notes'] else ''} |"
        )
    idle = ", ".join(f"{k.split('[')[1][:-1]} {v} MB" for k, v in meta.items() if k.startswith("idle_rss_mb"))
    lines += [
        "",
        "Peak RSS is the largest single process (one worker); idle RSS is one worker after start-up.",
    ]
    lines += ["", f"Idle RSS per worker: {idle}; echo server {meta['echo_idle_rss_mb']} MB."]
    for key, value in meta.items():
        if key.startswith("idle_per_worker["):
            lines.append(
                f"Idle, {key[16:-1]}: RSS {value['rss_mb']} MB, PSS {value['pss_mb']} MB per worker."
            )
    redis_costs = [
        f"{r['scenario']} {r['redis_cpu_us_per_call']:.0f} us"
        for r in report["results"]
        if not math.isnan(r.get("redis_cpu_us_per_call", float("nan"))) and "hit" in r["scenario"]
    ]
    if redis_costs:
        lines.append("Redis server CPU per call: " + ", ".join(redis_costs) + ".")
    for key, value in meta.items():
        if key.startswith("http_vs_grpc["):
            lines.append(_http_summary(key[13:-1], value))
    for key, value in meta.items():
        if key.startswith("workers["):
            lines.append(
                f"Workers ({key[8:-1]}): 2 workers = {value['ratio']}x one. CPU per call, server + Redis + "
                f"h2load: {value['cpu_us_per_call_all[1]']} us (1 worker), {value['cpu_us_per_call_all[2]']} us "
                f"(2); the cores allow at most {value['machine_bound_rps[1]']} and {value['machine_bound_rps[2]']} "
                f"calls/s, of which the runs reached {value['share_of_bound[1]']:.0%} and "
                f"{value['share_of_bound[2]']:.0%}."
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help="full mode (slower, 1M referrals)")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if shutil.which("h2load") is None:
        raise SystemExit("h2load is missing: apt-get install nghttp2-client")
    started = time.monotonic()
    report = run(args)
    report["meta"]["wall_s"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{report['meta']['mode']}-{args.loop}"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out / f"{name}.md").write_text(text + "\n")
    print()
    print(text)
    print(f"\nwritten to {args.out}/{name}.json and .md in {report['meta']['wall_s']}s")
    from bench.charts import record

    try:
        run_file = record(report, args.out / "runs", args.out / "charts")
    except ImportError as error:  # matplotlib missing: keep the run, skip the charts
        run_file = record(report, args.out / "runs", None)
        print(f"charts not drawn ({error}): pip install -e '.[bench]'")
    print(f"this run: {run_file}; charts in {args.out}/charts/")


if __name__ == "__main__":
    main()
