"""Events for other services (issue 18), through the wire: the transactional outbox, ListEvents,
WatchEvents (backlog then live, resume by cursor, progress, OUT_OF_RANGE past retention, two
workers on one database)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
import pytest
from google.protobuf import duration_pb2
from referral.v1 import auth_pb2, events_pb2, events_pb2_grpc, referral_pb2

from referral_service.domain.clock import utcnow
from tests.conftest import Api, bearer, start_api, stop_api
from tests.errors import expect_error
from tests.test_service_accounts import service_token

DEADLINE = 30.0
TTL = duration_pb2.Duration(seconds=86400)


def events_stub(api: Api) -> events_pb2_grpc.EventServiceStub:
    return events_pb2_grpc.EventServiceStub(api.channel)


async def reader(api: Api) -> tuple[events_pb2_grpc.EventServiceStub, tuple[tuple[str, str], ...]]:
    return events_stub(api), bearer(await service_token(api, "events:read"))


async def all_events(api: Api, after: int = 0, types: tuple[str, ...] = ()) -> list[events_pb2.Event]:
    stub, metadata = await reader(api)
    found: list[events_pb2.Event] = []
    token = ""
    while True:
        page = await stub.ListEvents(
            events_pb2.ListEventsRequest(after_cursor=after, types=types, page_size=2, page_token=token),
            metadata=metadata,
        )
        found += page.events
        if not page.next_page_token:
            return found
        token = page.next_page_token


async def story(api: Api) -> tuple[auth_pb2.User, auth_pb2.User, referral_pb2.ReferralCode]:
    """A user creates a code, another registers with it, the first deletes the code."""
    email = api.unique_email("referrer")
    referrer = await api.register(email)
    token = (await api.login(email)).access_token
    code = (
        await api.referral.CreateReferralCode(
            referral_pb2.CreateReferralCodeRequest(ttl=TTL), metadata=bearer(token)
        )
    ).referral_code
    referred = await api.register(referral_code=code.code)
    await api.referral.DeleteReferralCode(referral_pb2.DeleteReferralCodeRequest(), metadata=bearer(token))
    return referrer, referred, code


async def test_every_change_writes_its_event_in_order(api: Api) -> None:
    referrer, referred, code = await story(api)
    found = await all_events(api)
    assert [e.type for e in found] == [
        "user.registered",
        "referral_code.created",
        "user.registered",
        "referral.created",
        "referral_code.deleted",
    ]
    cursors = [e.cursor for e in found]
    assert cursors == sorted(cursors)
    assert len(set(cursors)) == len(cursors)
    assert len({e.id for e in found}) == len(found)
    assert all(e.id.startswith("evt_") for e in found)
    assert found[0].WhichOneof("payload") == "user_registered"
    assert found[0].user_registered.user_id == referrer.id
    assert found[0].user_registered.email == referrer.email
    assert found[1].referral_code_created.code == code.code
    assert found[1].referral_code_created.owner_id == referrer.id
    assert found[1].referral_code_created.expire_time == code.expire_time
    assert found[2].user_registered.referrer_id == referrer.id
    assert found[3].referral_created.user_id == referred.id
    assert found[3].referral_created.referrer_id == referrer.id
    assert found[4].referral_code_deleted.referral_code_id == found[1].referral_code_created.referral_code_id
    assert all(e.time.seconds > 0 for e in found)
    # A type filter, and resuming after a cursor.
    only = await all_events(api, types=("user.registered",))
    assert [e.user_registered.user_id for e in only] == [referrer.id, referred.id]
    assert [e.cursor for e in await all_events(api, after=cursors[2])] == cursors[3:]


async def test_no_event_without_its_change(api: Api) -> None:
    email = api.unique_email()
    await api.register(email)
    await expect_error(
        api.register(email.upper()), grpc.StatusCode.ALREADY_EXISTS, "EMAIL_ALREADY_REGISTERED"
    )
    _, token = await api.user_with_token()
    await expect_error(
        api.referral.DeleteReferralCode(referral_pb2.DeleteReferralCodeRequest(), metadata=bearer(token)),
        grpc.StatusCode.NOT_FOUND,
        "REFERRAL_CODE_NOT_FOUND",
    )
    assert [e.type for e in await all_events(api)] == ["user.registered", "user.registered"]


async def test_list_events_page_and_cursor(api: Api) -> None:
    stub, metadata = await reader(api)
    empty = await stub.ListEvents(events_pb2.ListEventsRequest(), metadata=metadata)
    assert list(empty.events) == []
    assert empty.cursor == 0
    assert empty.next_page_token == ""
    for _ in range(3):
        await api.register()
    page = await stub.ListEvents(events_pb2.ListEventsRequest(page_size=2), metadata=metadata)
    assert len(page.events) == 2
    assert page.next_page_token
    assert page.cursor == page.events[1].cursor
    rest = await stub.ListEvents(
        events_pb2.ListEventsRequest(page_size=2, page_token=page.next_page_token), metadata=metadata
    )
    assert len(rest.events) == 1
    assert rest.next_page_token == ""
    assert rest.cursor == rest.events[0].cursor
    # Nothing matches the filter: the cursor still moves to the head.
    none = await stub.ListEvents(events_pb2.ListEventsRequest(types=["referral.created"]), metadata=metadata)
    assert list(none.events) == []
    assert none.cursor == rest.cursor


async def test_access_and_bad_input(api: Api) -> None:
    stub = events_stub(api)
    _, user_token = await api.user_with_token()
    await expect_error(
        stub.ListEvents(events_pb2.ListEventsRequest(), metadata=bearer(user_token)),
        grpc.StatusCode.PERMISSION_DENIED,
        "SCOPE_MISSING",
    )
    other = await service_token(api, "users:read")
    await expect_error(
        stub.ListEvents(events_pb2.ListEventsRequest(), metadata=bearer(other)),
        grpc.StatusCode.PERMISSION_DENIED,
        "SCOPE_MISSING",
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.WatchEvents(events_pb2.WatchEventsRequest(), metadata=bearer(user_token)):
            pass
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    _, metadata = await reader(api)
    error = await expect_error(
        stub.ListEvents(
            events_pb2.ListEventsRequest(types=["user.deleted"], page_size=-1), metadata=metadata
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    )
    assert set(error.fields) == {"types", "page_size"}
    await expect_error(
        stub.ListEvents(events_pb2.ListEventsRequest(page_token="nonsense"), metadata=metadata),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.WatchEvents(events_pb2.WatchEventsRequest(types=["nope"]), metadata=metadata):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


class Watcher:
    """A WatchEvents stream read in the background into a queue."""

    def __init__(self, api: Api, metadata: tuple[tuple[str, str], ...], **request: object) -> None:
        self.call = events_stub(api).WatchEvents(events_pb2.WatchEventsRequest(**request), metadata=metadata)  # type: ignore[arg-type]
        self.messages: asyncio.Queue[events_pb2.WatchEventsResponse] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for message in self.call:
            await self.messages.put(message)

    async def first(self) -> events_pb2.WatchEventsResponse:
        return await asyncio.wait_for(self.messages.get(), DEADLINE)

    async def events(self, count: int) -> list[events_pb2.Event]:
        found: list[events_pb2.Event] = []
        async with asyncio.timeout(DEADLINE):
            while len(found) < count:
                found += (await self.messages.get()).events
        return found

    async def close(self) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await self.task


@contextlib.asynccontextmanager
async def watching(
    api: Api, metadata: tuple[tuple[str, str], ...], **request: object
) -> AsyncIterator[Watcher]:
    watcher = Watcher(api, metadata, **request)
    try:
        yield watcher
    finally:
        await watcher.close()


async def test_watch_from_now_then_resume_from_cursor(api: Api) -> None:
    await api.register()  # before the watch: not sent
    _, metadata = await reader(api)
    async with watching(api, metadata) as watcher:
        start = await watcher.first()
        assert list(start.events) == []
        assert start.cursor >= 1
        users = [await api.register() for _ in range(3)]
        seen = await watcher.events(3)
        assert [e.user_registered.user_id for e in seen] == [u.id for u in users]
    last = seen[1].cursor  # the consumer processed two of them, then lost the connection
    later = await api.register()
    async with watching(api, metadata, after_cursor=last) as watcher:
        assert (await watcher.first()).cursor == last
        resumed = await watcher.events(2)
        assert [e.user_registered.user_id for e in resumed] == [users[2].id, later.id]
    # From the start (0): the whole backlog, then live.
    async with watching(api, metadata, after_cursor=0) as watcher:
        await watcher.first()
        assert len(await watcher.events(5)) == 5
        live = await api.register()
        assert [e.user_registered.user_id for e in await watcher.events(1)] == [live.id]


async def test_watch_filter_and_progress(stack: object) -> None:
    api = await start_api(stack, events_progress_seconds=0.2)  # type: ignore[arg-type]
    try:
        _, metadata = await reader(api)
        async with watching(api, metadata, types=["referral_code.created"]) as watcher:
            start = (await watcher.first()).cursor
            await api.register()  # filtered out
            async with asyncio.timeout(DEADLINE):
                while True:  # progress messages carry the cursor past it
                    message = await watcher.messages.get()
                    assert list(message.events) == []
                    if message.cursor > start:
                        break
            _, token = await api.user_with_token()
            await api.referral.CreateReferralCode(
                referral_pb2.CreateReferralCodeRequest(ttl=TTL), metadata=bearer(token)
            )
            created = await watcher.events(1)
            assert [e.type for e in created] == ["referral_code.created"]
    finally:
        await stop_api(api)


async def test_cursor_out_of_range(api: Api) -> None:
    stub, metadata = await reader(api)
    for _ in range(3):
        await api.register()
    error = await expect_error(
        stub.ListEvents(events_pb2.ListEventsRequest(after_cursor=10**9), metadata=metadata),
        grpc.StatusCode.OUT_OF_RANGE,
        "EVENT_CURSOR_UNKNOWN",
    )
    head = int(error.metadata["head_cursor"])
    assert head >= 3
    # Retention: housekeeping purges old events (never the newest one).
    purged = await api.app.store.transact(lambda uow: uow.events.purge(utcnow() + timedelta(days=1)))
    assert purged == 2
    error = await expect_error(
        stub.ListEvents(events_pb2.ListEventsRequest(after_cursor=0), metadata=metadata),
        grpc.StatusCode.OUT_OF_RANGE,
        "EVENT_CURSOR_EXPIRED",
    )
    oldest = int(error.metadata["oldest_cursor"])
    assert 0 < oldest < head
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.WatchEvents(events_pb2.WatchEventsRequest(after_cursor=0), metadata=metadata):
            pass
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    page = await stub.ListEvents(events_pb2.ListEventsRequest(after_cursor=oldest), metadata=metadata)
    assert [e.cursor for e in page.events] == [head]


async def test_two_workers_each_watcher_sees_every_event_once(api: Api) -> None:
    other = await start_api(api.stack)
    try:
        if api.stack.postgres:  # commits elsewhere wake the feed at once (NOTIFY), not at a poll
            for app in (api.app, other.app):
                assert app.event_listener is not None
                await asyncio.wait_for(app.event_listener.listening.wait(), DEADLINE)
        _, metadata = await reader(api)
        async with watching(api, metadata) as first, watching(other, metadata) as second:
            await first.first()
            await second.first()
            users = []
            for index in range(6):
                users.append(await (api if index % 2 else other).register())
            expected = [u.id for u in users]
            for watcher in (first, second):
                seen = await watcher.events(6)
                assert [e.user_registered.user_id for e in seen] == expected
    finally:
        await stop_api(other)


async def test_watch_over_http_as_ndjson_and_sse(api: Api) -> None:
    import httpx

    token = await service_token(api, "events:read")
    headers = {"authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.app.http_port}", timeout=DEADLINE) as http:
        # Refused before the stream starts: a plain error envelope.
        refused = await http.get("/v1/events:watch", params={"types": "nope"}, headers=headers)
        assert refused.status_code == 400
        assert refused.json()["error"]["details"][0]["reason"] == "VALIDATION_FAILED"
        assert (await http.get("/v1/events:watch")).status_code == 401
        listed = await http.get("/v1/events", headers=headers)
        assert listed.status_code == 200
        assert listed.json()["events"] == []
        async with http.stream(
            "GET", "/v1/events:watch", params={"afterCursor": "0"}, headers=headers
        ) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("application/x-ndjson")
            lines = stream.aiter_lines()
            first = json.loads(await anext(lines))
            assert first == {"events": [], "cursor": "0"}
            user = await api.register()
            async with asyncio.timeout(DEADLINE):
                while True:
                    message = json.loads(await anext(lines))
                    if message["events"]:
                        break
            (event,) = message["events"]
            assert event["type"] == "user.registered"
            assert event["userRegistered"]["userId"] == str(user.id)
            assert message["cursor"] == event["cursor"]
        async with http.stream(
            "GET",
            "/v1/events:watch",
            params={"afterCursor": "0"},
            headers={**headers, "accept": "text/event-stream"},
        ) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.aiter_lines()
            async with asyncio.timeout(DEADLINE):
                while True:
                    line = await anext(lines)
                    if line.startswith("data: ") and '"user.registered"' in line:
                        break
            assert json.loads(line.removeprefix("data: "))["events"][0]["id"] == event["id"]
