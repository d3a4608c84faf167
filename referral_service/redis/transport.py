"""The one Redis transport every Redis adapter shares: the client, auto-pipelined script calls,
the circuit breaker and the deadlines.

Redis is an accelerator, never a dependency: every call is bounded by a deadline, and a circuit
breaker stops calling Redis after a few failures, so an outage costs the adapters nothing but
their fast answers. Whatever goes wrong, a call raises :class:`RedisUnavailable` and the adapter
falls back (a cache miss, a database check, an in-process count).

The key prefix (``REFERRAL_REDIS_KEY_PREFIX``) is held here; each adapter defines its own keys
under it, once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError, ResponseError

from referral_service.resilience import CircuitBreaker

T = TypeVar("T")

#: A queued script call: the script, its keys and arguments, and the caller's future.
_Queued = tuple[AsyncScript, list[Any], list[Any], "asyncio.Future[Any]"]


class RedisUnavailable(ConnectionError):
    """Redis was not asked (the breaker is open) or did not answer in time."""


class AutoPipeline:
    """Script calls made while a batch is on the wire leave together in the next one: under
    load, one write and one read serve many concurrent calls instead of a round trip each
    (what ioredis calls auto-pipelining, and Lettuce does by default). An idle client sends a
    call at once (one loop iteration later, so that calls made together leave together).

    Batches go over one dedicated connection, written and read directly (redis-py's
    connection and its hiredis parser, without the per-command client, pool and pipeline
    layers, which cost more event-loop time than the round trip itself). A connection that
    fails or times out is dropped by redis-py and reopened by the next batch.

    Callers wait on a future; one that gives up (deadline) simply stops waiting. A script the
    server does not know (after a restart or SCRIPT FLUSH) is loaded and the call retried.
    """

    def __init__(self, client: aioredis.Redis, timeout: float) -> None:
        self._client = client
        self._timeout = timeout
        self._queue: list[_Queued] = []
        self._sender: asyncio.Task[None] | None = None
        self._conn: Any = None

    def call(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((script, keys, args, future))
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send_all())
        return future

    async def _send_all(self) -> None:
        batch: list[_Queued] = []
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._send([item for item in batch if not item[3].done()])
        except BaseException as error:  # cancelled (shutdown): fail every waiting call
            for *_, future in batch + self._queue:
                if not future.done():
                    future.set_exception(ConnectionError(f"redis call not completed: {error!r}"))
            self._queue = []
            raise
        finally:
            self._sender = None

    async def _send(self, batch: list[_Queued]) -> None:
        if not batch:
            return
        results: list[Any] = []
        try:
            async with asyncio.timeout(self._timeout):
                if self._conn is None:
                    self._conn = await self._client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
                conn = self._conn
                commands = [
                    ("EVALSHA", script.sha, len(keys), *keys, *args) for script, keys, args, _ in batch
                ]
                await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
                for _ in batch:
                    try:
                        results.append(await conn.read_response())
                    except ResponseError as error:  # this call's error; the stream is intact
                        results.append(error)
                for index, result in enumerate(results):
                    if isinstance(result, NoScriptError):
                        script, keys, args, _ = batch[index]
                        results[index] = await script(keys=keys, args=args)  # loads it
        except Exception as error:  # the connection failed or timed out: every call failed
            for *_, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (*_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.disconnect()
            await self._client.connection_pool.release(conn)


class RedisTransport:
    """One client (from the URL), one auto-pipeline, one breaker and its health callback."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "referral:",
        timeout: float = 0.25,
        breaker_threshold: int = 3,
        breaker_reset_seconds: float = 5.0,
        on_health_change: Callable[[bool], None] | None = None,
        spans: Any | None = None,
    ) -> None:
        """``spans``: with tracing on, makes a client span per script call
        (``tracing.ClientSpans``); the instrumentation package sees the other commands."""
        self.prefix = prefix
        self._spans = spans
        self._script_names: dict[str, str] = {}
        self._timeout = timeout
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            # Every operation runs under one deadline in execute(); a per-socket timeout would
            # add a wait_for (a task) per write and a timer per read.
            socket_timeout=None,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
            max_connections=64,
        )
        self._on_health_change = on_health_change
        self.breaker = CircuitBreaker(breaker_threshold, breaker_reset_seconds, self._changed)
        self._batch = AutoPipeline(self._client, timeout)

    def _changed(self, up: bool) -> None:
        if self._on_health_change is not None:
            self._on_health_change(up)

    def script(self, source: str, name: str = "script") -> AsyncScript:
        """Register a Lua script (loaded on the server at its first use); ``name`` names its
        spans."""
        script = self._client.register_script(source)
        self._script_names[script.sha] = name
        return script

    async def execute(self, command: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run ``command`` on the client under the breaker and the deadline."""
        return await self._guarded(lambda: command(self._client), deadline=True)

    async def run_script(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        """A Lua script call through the auto-pipeline. No timer per call: each batch has its
        own deadline, and a call waits for at most two batches (the one on the wire, its own)."""
        if self._spans is None:
            return await self._guarded(lambda: self._batch.call(script, keys, args), deadline=False)
        name = self._script_names.get(script.sha, "script")
        with self._spans.span(
            f"EVALSHA {name}", **{"db.operation.name": "EVALSHA", "db.query.summary": name}
        ):
            return await self._guarded(lambda: self._batch.call(script, keys, args), deadline=False)

    def start_script(
        self, script: AsyncScript, keys: list[Any], args: list[Any]
    ) -> asyncio.Future[Any] | None:
        """Queue a Lua script call now, without awaiting it: it leaves in the next batch, with
        whatever the caller queues before yielding (so a look-up started before a rate-limit
        check shares that check's round trip). None when the breaker is open. The breaker
        counts the outcome when it arrives, whether or not anyone awaits the future (which
        raises the error of a failed call)."""
        if not self.breaker.allow():
            return None
        future = self._batch.call(script, keys, args)
        future.add_done_callback(self._account)
        if self._spans is not None:
            name = self._script_names.get(script.sha, "script")
            span = self._spans.start(
                f"EVALSHA {name}", **{"db.operation.name": "EVALSHA", "db.query.summary": name}
            )
            future.add_done_callback(lambda _: span.end())
        return future

    def _account(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            return
        error = future.exception()  # also marks it retrieved: no warning for an unread future
        if error is None:
            self.breaker.success()
        elif isinstance(error, (RedisError, OSError, TimeoutError)):
            self.breaker.failure(error)

    async def _guarded(self, fn: Callable[[], Awaitable[T]], *, deadline: bool) -> T:
        if not self.breaker.allow():
            raise RedisUnavailable("redis circuit breaker is open")
        try:
            if deadline:
                async with asyncio.timeout(self._timeout * 2):  # no extra task, unlike wait_for
                    result = await fn()
            else:
                result = await fn()
        except (RedisError, OSError, TimeoutError) as error:
            self.breaker.failure(error)
            raise RedisUnavailable(str(error)) from error
        self.breaker.success()
        return result

    async def ping(self) -> bool:
        try:
            await self.execute(lambda client: client.ping())
        except RedisUnavailable:
            return False
        return True

    async def close(self) -> None:
        await self._batch.close()
        await self._client.aclose()
