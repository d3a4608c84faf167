"""PostgreSQL down (refusing or hanging, cut with a loopback proxy) or a connection lost at a known
point (its session ended by the server while the pool opens it, in a statement, at commit, at
rollback): calls fail fast with UNAVAILABLE and a RetryInfo (never INTERNAL, never a hang),
health reports NOT_SERVING, the service recovers by itself, and no committed write is lost. Plus:
client deadlines cancel the server's work without leaving half-written rows.

No test synchronises on time (no sleeps, no cut racing the calls): the service is cut, paused
and resumed from hooks on its engine at the moment a call reaches a given point, and the tests
wait for events (the call's answer, its access line, the health Watch stream, a task asked to
cancel), so they pass the same way on a busy machine.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2
from referral.v1 import auth_pb2, referral_pb2
from sqlalchemy import event, make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import await_only

from referral_service.storage import db as storage_db
from tests.conftest import PASSWORD, Api, Stack, bearer, start_api, stop_api
from tests.errors import expect_error
from tests.invariants import check_invariants, count_rows
from tests.proxy import Proxy

#: The database down: every call answers within this (the database timeout is 1 s), never hangs.
DEADLINE = 5.0
#: Only against a hang, where no test is about speed: nothing here waits for time to pass.
HANG_GUARD_SECONDS = 60.0
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _ttl(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromTimedelta(timedelta(seconds=seconds))
    return value


@pytest.fixture
async def proxied_db(stack: Stack, request: pytest.FixtureRequest) -> AsyncIterator[tuple[Api, Proxy]]:
    """The service on PostgreSQL through a proxy the test can cut; settings from an indirect
    parameter (default: a 1 s database timeout, so that calls fail fast)."""
    url = make_url(stack.database_url)
    proxy = await Proxy(url.host or "127.0.0.1", url.port or 5432).start()
    overrides = {"database_timeout_seconds": 1.0, **getattr(request, "param", {})}
    api = await start_api(stack, database_url=proxy.database_url(stack.database_url), **overrides)
    try:
        yield api, proxy
    finally:
        proxy.restore()
        await stop_api(api)
        await proxy.close()


async def _health(api: Api, service: str = "") -> int:
    response = await api.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE)
    return int(response.status)


async def _wait_for_health(api: Api, status: int) -> None:
    """Until the health service reports ``status``: its Watch stream tells each change."""
    stream = api.health.Watch(health_pb2.HealthCheckRequest(service=""))
    try:
        async with asyncio.timeout(HANG_GUARD_SECONDS):
            async for response in stream:
                if response.status == status:
                    return
    finally:
        stream.cancel()
    pytest.fail(f"the health stream ended before reporting {status}")


def _register(
    api: Api, email: str, request_id: str = "", timeout: float = HANG_GUARD_SECONDS
) -> grpc.aio.UnaryUnaryCall:  # type: ignore[type-arg]
    return api.auth.Register(
        auth_pb2.RegisterRequest(email=email, password=PASSWORD, request_id=request_id), timeout=timeout
    )


# --- hooks on the service's engine -----------------------------------------------------------


class _Hooks:
    """Listeners on an engine, removed at the end of the test."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine.sync_engine
        self._listeners: list[tuple[str, Callable[..., Any]]] = []

    def listen(self, name: str, fn: Callable[..., Any], **kw: Any) -> None:
        event.listen(self.engine, name, fn, **kw)
        self._listeners.append((name, fn))

    def remove(self) -> None:
        for name, fn in self._listeners:
            event.remove(self.engine, name, fn)
        self._listeners.clear()


class Cut(_Hooks):
    """Ends the server session of the service's next connection to reach a point, from a separate
    admin connection (``pg_terminate_backend`` with a timeout returns once the session is gone):
    ``connect`` (the pool opening it, before SQLAlchemy's own set-up queries), ``statement`` (the
    next statement starting with the given text), ``commit`` or ``rollback`` (of a transaction).
    Each ``arm`` cuts once."""

    def __init__(self, engine: AsyncEngine, admin: asyncpg.Connection) -> None:
        super().__init__(engine)
        self.admin = admin
        self.cuts = 0
        self._armed = False

    def _cut(self, driver_connection: Any) -> None:
        if not self._armed:
            return
        self._armed = False
        pid = driver_connection.get_server_pid()
        assert await_only(self.admin.fetchval("SELECT pg_terminate_backend($1, 5000)", pid))
        self.cuts += 1

    def arm(self, point: str, statement: str = "") -> None:
        self.remove()
        self._armed = True
        if point == "connect":
            self.listen(
                "connect", lambda dbapi_conn, _record: self._cut(dbapi_conn.driver_connection), insert=True
            )
        elif point == "statement":

            def before(conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
                if sql.startswith(statement):
                    self._cut(conn.connection.driver_connection)

            self.listen("before_cursor_execute", before)
        elif point in ("commit", "rollback"):

            def ending(conn: Any) -> None:
                if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
                    self._cut(conn.connection.driver_connection)

            self.listen(point, ending)
        else:
            raise ValueError(point)


@pytest.fixture
async def cut(api: Api) -> AsyncIterator[Cut]:
    url = make_url(api.stack.database_url)
    admin = await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username, password=url.password, database=url.database
    )
    hooks = Cut(api.app.db.engine, admin)
    try:
        yield hooks
    finally:
        hooks.remove()
        await admin.close()


class WatchedTask(asyncio.Task):  # type: ignore[type-arg]
    """A task that tells when it is asked to cancel (asyncio has no callback for that)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cancel_requested = asyncio.Event()

    def cancel(self, msg: Any = None) -> bool:
        self.cancel_requested.set()
        return super().cancel(msg)


@pytest.fixture
async def watched_tasks() -> AsyncIterator[None]:
    """Every task made meanwhile (grpc's task for each call among them) is a ``WatchedTask``."""
    loop = asyncio.get_running_loop()
    previous = loop.get_task_factory()
    loop.set_task_factory(lambda loop, coro, **kw: WatchedTask(coro, loop=loop, **kw))
    try:
        yield
    finally:
        loop.set_task_factory(previous)


class Pause:
    """Holds one call's registration inside its transaction until the server has cancelled the
    call. The call is known by its request_id and email: its idempotency look-up (before the
    transaction, in the call's own task) names the task to watch, and its ``INSERT INTO users``
    waits until that task is asked to cancel: on PostgreSQL the transaction runs in that task
    and ends there; on SQLite it runs in a task of its own and finishes. ``entered`` is set
    once the INSERT is held."""

    def __init__(self, api: Api, request_id: str, email: str) -> None:
        self.entered = asyncio.Event()
        self._call_task: WatchedTask | None = None
        self._reads = _Hooks(api.app.db.engine)
        self._writes = _Hooks(api.app.db.write_engine)

        def look_up(_conn: Any, _cursor: Any, sql: str, parameters: Any, *_args: Any) -> None:
            if "FROM idempotency_keys" in sql and request_id in parameters:
                task = asyncio.current_task()
                assert isinstance(task, WatchedTask)
                self._call_task = task

        def insert(_conn: Any, _cursor: Any, sql: str, parameters: Any, *_args: Any) -> None:
            if sql.startswith("INSERT INTO users") and email in parameters and not self.entered.is_set():
                assert self._call_task is not None
                self.entered.set()
                await_only(self._call_task.cancel_requested.wait())

        self._reads.listen("before_cursor_execute", look_up)
        self._writes.listen("before_cursor_execute", insert)

    def remove(self) -> None:
        self._reads.remove()
        self._writes.remove()


class AccessLines(logging.Handler):
    """The access line of each call, by its ``x-request-id``: logged once its handler has ended."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.codes: dict[str, str] = {}
        self._logged: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

    def emit(self, record: logging.LogRecord) -> None:
        request_id = str(getattr(record, "request_id", ""))
        self.codes[request_id] = str(getattr(record, "code", ""))
        self._logged[request_id].set()

    async def code(self, request_id: str) -> str:
        """The status code the call ended with on the server, once it has ended there."""
        async with asyncio.timeout(HANG_GUARD_SECONDS):
            await self._logged[request_id].wait()
        return self.codes[request_id]


@pytest.fixture
def access_lines(caplog: pytest.LogCaptureFixture) -> Any:
    lines = AccessLines()
    logger = logging.getLogger("referral_service.access")
    with caplog.at_level(logging.INFO, logger="referral_service.access"):
        logger.addHandler(lines)
        try:
            yield lines
        finally:
            logger.removeHandler(lines)


# --- the database down -----------------------------------------------------------------------


@pytest.mark.postgres_stacks
@pytest.mark.parametrize("failure", ["refuse", "hang"])
async def test_database_down_fails_fast_reports_not_serving_and_recovers(
    proxied_db: tuple[Api, Proxy], failure: str
) -> None:
    api, proxy = proxied_db
    owner = api.unique_email()
    await api.register(owner)
    tokens = await api.login(owner)
    created = await api.referral.CreateReferralCode(
        referral_pb2.CreateReferralCodeRequest(ttl=_ttl(3600)), metadata=bearer(tokens.access_token)
    )
    assert await _health(api) == SERVING

    getattr(proxy, failure)()
    calls = {
        "register": _register(api, api.unique_email(), timeout=DEADLINE),
        "login": api.auth.Login(auth_pb2.LoginRequest(email=owner, password=PASSWORD), timeout=DEADLINE),
        "lookup (uncached)": api.referral.GetReferralCodeByEmail(
            referral_pb2.GetReferralCodeByEmailRequest(email=api.unique_email()), timeout=DEADLINE
        ),
        "my code": api.referral.GetMyReferralCode(
            referral_pb2.GetMyReferralCodeRequest(), metadata=bearer(tokens.access_token), timeout=DEADLINE
        ),
    }
    for name, call in calls.items():
        error = await expect_error(call, UNAVAILABLE, "SERVICE_UNAVAILABLE")
        assert error.retry_seconds, name
        assert "database" in error.message
    # NOT_SERVING since the first call found the database gone, while the probe cannot reach it
    for service in ("", "referral.v1.AuthService", "referral-service.database"):
        assert await _health(api, service) == NOT_SERVING

    proxy.restore()
    await _wait_for_health(api, SERVING)
    await api.login(owner)  # works again, no restart
    mine = await api.referral.GetMyReferralCode(
        referral_pb2.GetMyReferralCodeRequest(), metadata=bearer(tokens.access_token)
    )
    assert mine.referral_code.code == created.referral_code.code  # committed before the outage
    await check_invariants(api.app.db)


@pytest.mark.postgres_stacks
async def test_a_database_restart_while_the_pool_is_idle_costs_no_call(
    proxied_db: tuple[Api, Proxy], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pooled connections that idled through a restart are checked (and replaced) before a call
    uses them: no call sees the restart. Busy connections skip the check (see db.py); here every
    returned connection counts as idle, instead of waiting for the idle window to pass."""
    api, proxy = proxied_db
    owner = api.unique_email()
    user = await api.register(owner)
    tokens = await api.login(owner)
    for _ in range(3):  # several pooled connections, each used and returned
        await asyncio.gather(*(api.login(owner) for _ in range(4)))
    monkeypatch.setattr(storage_db, "PING_AFTER_IDLE_SECONDS", 0.0)
    proxy.restore()  # the server "restarted": every open connection is gone, new ones work
    results = await asyncio.gather(
        *(api.login(owner) for _ in range(4)),
        *(
            api.referral.ListReferrals(
                referral_pb2.ListReferralsRequest(referrer_id=user.id),
                metadata=bearer(tokens.access_token),
                timeout=DEADLINE,
            )
            for _ in range(4)
        ),
    )
    assert len(results) == 8  # every call answered OK


@pytest.mark.postgres_stacks
@pytest.mark.parametrize(
    "proxied_db",
    # a pooled connection for every call, and no database timeout on a busy machine: each call
    # fails because of the cut or not at all
    [{"database_pool_size": 16, "database_timeout_seconds": HANG_GUARD_SECONDS}],
    indirect=True,
    ids=["pool-for-all"],
)
async def test_no_committed_write_is_lost_across_an_outage(proxied_db: tuple[Api, Proxy]) -> None:
    """Registrations in flight when the database goes away (at the 10th commit: transactions are
    then at every stage, some commits landed but unanswered), then one more that finds it gone
    while the pool opens a connection: each call answers OK or UNAVAILABLE, every call that
    answered OK has its row, and every call retried with its request_id yields exactly one user
    (the first result if its commit had landed)."""
    api, proxy = proxied_db
    request_ids = [str(uuid.uuid4()) for _ in range(30)]
    emails = [api.unique_email() for _ in request_ids]
    users: dict[int, int] = {}  # index -> user id, for the calls that answered OK
    unavailable = 0
    commits = 0
    hooks = _Hooks(api.app.db.engine)

    def on_commit(_conn: Any) -> None:
        nonlocal commits
        commits += 1
        if commits == 10:
            proxy.refuse()  # every connection dropped, new ones reset: this commit never lands

    hooks.listen("commit", on_commit)

    async def one(index: int) -> None:
        nonlocal unavailable
        try:
            users[index] = (await _register(api, emails[index], request_ids[index])).user.id
        except grpc.aio.AioRpcError as error:
            assert error.code() == UNAVAILABLE, error
            unavailable += 1

    try:
        await asyncio.gather(*(one(i) for i in range(len(request_ids))))
    finally:
        hooks.remove()
    assert proxy.mode == "refuse"
    assert unavailable >= 1  # at least the 10th
    assert len(users) + unavailable == len(request_ids)

    # With the database still gone, a call whose connection is reset while the pool opens it.
    await api.app.db.engine.dispose()  # no pooled connection left: the next call opens one
    request_ids.append(str(uuid.uuid4()))
    emails.append(api.unique_email())
    await expect_error(_register(api, emails[-1], request_ids[-1]), UNAVAILABLE, "SERVICE_UNAVAILABLE")
    assert await _health(api) == NOT_SERVING

    proxy.restore()
    await _wait_for_health(api, SERVING)
    assert await count_rows(api.app.db, "users") >= len(users)
    retried = await asyncio.gather(*(_register(api, e, r) for e, r in zip(emails, request_ids, strict=True)))
    assert len({response.user.id for response in retried}) == len(request_ids)
    for index, user_id in users.items():
        assert retried[index].user.id == user_id  # an answered registration is the one kept
    assert await count_rows(api.app.db, "users") == len(request_ids)
    await check_invariants(api.app.db)


class HangUp:
    """A server that begins PostgreSQL's handshake and hangs up: it declines TLS, reads the
    startup message and closes the connection, as a client sees a server or a network that
    drops a connection while it is being opened."""

    async def start(self) -> HangUp:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.address: tuple[str, int] = self._server.sockets[0].getsockname()[:2]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        message = await reader.readexactly(8)
        if message[4:] == (80877103).to_bytes(4, "big"):  # SSLRequest: no TLS here
            writer.write(b"N")
            message = await reader.readexactly(4)
        await reader.readexactly(int.from_bytes(message[:4], "big") - len(message))
        writer.close()
        await writer.wait_closed()

    async def close(self) -> None:
        self._server.close()
        await self._server.wait_closed()


@pytest.mark.postgres_stacks
async def test_a_connection_dropped_while_the_pool_opens_it_is_unavailable(
    proxied_db: tuple[Api, Proxy],
) -> None:
    """The server hangs up during the handshake of the pool's new connection (asyncpg: the
    connection "was closed in the middle of operation", which SQLAlchemy wraps in a bare
    DBAPIError): reads and writes answer UNAVAILABLE, and work again once it answers."""
    api, proxy = proxied_db
    owner = api.unique_email()
    await api.register(owner)
    tokens = await api.login(owner)
    code = (
        await api.referral.CreateReferralCode(
            referral_pb2.CreateReferralCodeRequest(ttl=_ttl(3600)), metadata=bearer(tokens.access_token)
        )
    ).referral_code.code
    users = await count_rows(api.app.db, "users")
    email, request_id = api.unique_email(), str(uuid.uuid4())

    def lookup() -> Any:
        return api.referral.GetReferralCodeByEmail(
            referral_pb2.GetReferralCodeByEmailRequest(email=owner), timeout=DEADLINE
        )

    hang_up = await HangUp().start()
    database = proxy.target
    proxy.target = hang_up.address  # new connections reach the server that hangs up
    try:
        await api.app.db.engine.dispose()  # no pooled connection: each call opens one
        for call in (_register(api, email, request_id, timeout=DEADLINE), lookup()):
            error = await expect_error(call, UNAVAILABLE, "SERVICE_UNAVAILABLE")
            assert error.retry_seconds
    finally:
        proxy.target = database
        await hang_up.close()
    await _wait_for_health(api, SERVING)
    assert await count_rows(api.app.db, "users") == users
    assert (await _register(api, email, request_id)).user.email == email
    assert (await lookup()).referral_code.code == code
    await check_invariants(api.app.db)


# --- a connection lost at a known point -----------------------------------------------------

CUTS = [
    pytest.param("register", "connect", "", id="write-while-the-pool-opens-it"),
    pytest.param("register", "statement", "INSERT INTO users", id="write-in-a-statement"),
    pytest.param("register", "commit", "", id="write-at-commit"),
    pytest.param("lookup", "connect", "", id="read-while-the-pool-opens-it"),
    pytest.param("lookup", "statement", "SELECT referral_codes.id", id="read-in-a-statement"),
]


@pytest.mark.postgres_stacks
@pytest.mark.parametrize(("operation", "point", "statement"), CUTS)
async def test_a_connection_lost_at_any_point_is_unavailable_and_loses_nothing(
    api: Api, cut: Cut, operation: str, point: str, statement: str
) -> None:
    owner = api.unique_email()
    await api.register(owner)
    tokens = await api.login(owner)
    code = (
        await api.referral.CreateReferralCode(
            referral_pb2.CreateReferralCodeRequest(ttl=_ttl(3600)), metadata=bearer(tokens.access_token)
        )
    ).referral_code.code
    users = await count_rows(api.app.db, "users")
    email, request_id = api.unique_email(), str(uuid.uuid4())

    def call() -> Any:
        if operation == "register":
            return _register(api, email, request_id)
        return api.referral.GetReferralCodeByEmail(
            referral_pb2.GetReferralCodeByEmailRequest(email=owner), timeout=HANG_GUARD_SECONDS
        )

    await api.app.db.engine.dispose()  # no pooled connection: the call opens one
    cut.arm(point, statement)
    error = await expect_error(call(), UNAVAILABLE, "SERVICE_UNAVAILABLE")
    assert cut.cuts == 1
    assert error.retry_seconds
    assert "database" in error.message
    assert await count_rows(api.app.db, "users") == users  # the cut transaction left nothing
    await check_invariants(api.app.db)

    # Retried, the call succeeds (with its request_id a registration is made exactly once).
    if operation == "register":
        first = (await call()).user
        assert (await call()).user.id == first.id
        assert await count_rows(api.app.db, "users") == users + 1
    else:
        assert (await call()).referral_code.code == code
    await check_invariants(api.app.db)


@pytest.mark.postgres_stacks
async def test_a_connection_lost_at_rollback_keeps_the_answer(api: Api, cut: Cut) -> None:
    """A registration refused (email taken) whose connection is lost as its transaction rolls
    back: the server discards the transaction with the connection, so the answer stays
    ALREADY_EXISTS, and the next calls get a working connection."""
    email = api.unique_email()
    await api.register(email)
    users = await count_rows(api.app.db, "users")
    cut.arm("rollback")
    await expect_error(_register(api, email), grpc.StatusCode.ALREADY_EXISTS, "EMAIL_ALREADY_REGISTERED")
    assert cut.cuts == 1
    assert await count_rows(api.app.db, "users") == users
    await api.login(email)
    await api.register()
    await check_invariants(api.app.db)


# --- client deadlines ------------------------------------------------------------------------


async def test_a_client_deadline_cancels_the_work_and_leaves_no_half_written_row(
    watched_tasks: None, api: Api, access_lines: AccessLines
) -> None:
    """Registrations with a referral code (a user, a code use, a counter and a request id in one
    transaction) whose deadline passes while the server is inside the transaction (held there
    until the server has cancelled the call): the server sees the cancellation, and the
    registration exists whole or not at all (SQLite finishes a transaction it has begun,
    PostgreSQL drops it); retried with its request_id it is made exactly once. The deadline
    doubles until a call reaches its transaction in time; a call whose deadline passes earlier
    is cancelled earlier (or never started), and checked the same way."""
    owner = api.unique_email()
    await api.register(owner)
    tokens = await api.login(owner)
    code = (
        await api.referral.CreateReferralCode(
            referral_pb2.CreateReferralCodeRequest(ttl=_ttl(3600)), metadata=bearer(tokens.access_token)
        )
    ).referral_code.code
    attempts: list[tuple[str, str]] = []
    deadline = 0.1
    caught = False
    while not caught:
        assert deadline < HANG_GUARD_SECONDS, "no call reached its transaction before its deadline"
        email, request_id, call_id = api.unique_email(), str(uuid.uuid4()), uuid.uuid4().hex
        attempts.append((email, request_id))
        pause = Pause(api, request_id, email)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await api.auth.Register(
                    auth_pb2.RegisterRequest(
                        email=email, password=PASSWORD, referral_code=code, request_id=request_id
                    ),
                    timeout=deadline,
                    metadata=(("x-request-id", call_id),),
                )
            assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            caught = pause.entered.is_set()
            if caught:  # the server cancelled the call inside its transaction, then ended it
                assert await access_lines.code(call_id) == "CANCELLED"
        finally:
            pause.remove()
        await check_invariants(api.app.db)
        deadline *= 2

    # A retry returns the first result when the first call did commit, or registers now.
    for email, request_id in attempts:
        await api.auth.Register(
            auth_pb2.RegisterRequest(
                email=email, password=PASSWORD, referral_code=code, request_id=request_id
            )
        )
    assert await count_rows(api.app.db, "users") == len(attempts) + 1
    await check_invariants(api.app.db)
