"""referral.v1.EventService: protos in, domain calls, protos out.

An event's ``data`` holds its payload message's fields by their proto names; ``PAYLOADS`` says
which ``Event.payload`` field each type fills. A new event type adds its message to
events.proto and one line here."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any

from google.protobuf import json_format
from referral.v1 import events_pb2, events_pb2_grpc

from referral_service.api import convert
from referral_service.domain import events
from referral_service.domain.events import EventService
from referral_service.domain.models import Event

#: Event type -> the ``Event.payload`` oneof field it sets.
PAYLOADS: dict[str, str] = {
    events.USER_REGISTERED: "user_registered",
    events.REFERRAL_CREATED: "referral_created",
    events.REFERRAL_CODE_CREATED: "referral_code_created",
    events.REFERRAL_CODE_DELETED: "referral_code_deleted",
}


def event(item: Event) -> events_pb2.Event:
    message = events_pb2.Event(
        id=item.id, cursor=item.cursor, type=item.type, time=convert.timestamp(item.time)
    )
    field = PAYLOADS.get(item.type)
    if field is not None:
        json_format.ParseDict(dict(item.data), getattr(message, field), ignore_unknown_fields=True)
    return message


class EventServicer(events_pb2_grpc.EventServiceServicer):
    def __init__(self, service: EventService) -> None:
        self._service = service

    async def ListEvents(
        self, request: events_pb2.ListEventsRequest, context: object
    ) -> events_pb2.ListEventsResponse:
        page = await self._service.list(
            request.after_cursor, list(request.types), request.page_size, request.page_token
        )
        return events_pb2.ListEventsResponse(
            events=[event(item) for item in page.events],
            cursor=page.cursor,
            next_page_token=page.next_page_token,
        )

    async def WatchEvents(  # type: ignore[override]  # returns the stream once admitted
        self, request: events_pb2.WatchEventsRequest, context: object
    ) -> Any:
        """Validates and returns the stream (an async iterator of responses): the transports
        iterate it after the pipeline has admitted the call."""
        after = request.after_cursor if request.HasField("after_cursor") else None
        batches = await self._service.watch(after, list(request.types))
        return _responses(batches)


async def _responses(
    batches: AsyncGenerator[events.WatchBatch],
) -> AsyncGenerator[events_pb2.WatchEventsResponse]:
    async with contextlib.aclosing(batches):
        async for batch in batches:
            yield events_pb2.WatchEventsResponse(
                events=[event(item) for item in batch.events], cursor=batch.cursor
            )
