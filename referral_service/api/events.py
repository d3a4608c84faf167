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
from referral_service.domain import events, models
from referral_service.domain.events import EventService
from referral_service.domain.models import Event
from referral_service.domain.webhooks import WebhookService
from referral_service.pipeline.context import current_principal

#: Event type -> the ``Event.payload`` oneof field it sets.
PAYLOADS: dict[str, str] = {
    events.USER_REGISTERED: "user_registered",
    events.REFERRAL_CREATED: "referral_created",
    events.REFERRAL_CODE_CREATED: "referral_code_created",
    events.REFERRAL_CODE_DELETED: "referral_code_deleted",
    events.WEBHOOK_ENDPOINT_DISABLED: "webhook_endpoint_disabled",
    events.EMAIL_VERIFIED: "email_verified",
    events.CONVERSION_RECORDED: "conversion_recorded",
    events.CONVERSION_REVERSED: "conversion_reversed",
    events.REFERRAL_QUALIFIED: "referral_qualified",
    events.REFERRAL_REJECTED: "referral_rejected",
    events.REWARD_HELD: "reward_held",
    events.REWARD_CANCELED: "reward_corrected",
    events.REWARD_CLAWED_BACK: "reward_corrected",
}

_STATES = {
    models.DELIVERY_PENDING: events_pb2.WebhookDelivery.STATE_PENDING,
    models.DELIVERY_SUCCEEDED: events_pb2.WebhookDelivery.STATE_SUCCEEDED,
    models.DELIVERY_FAILED: events_pb2.WebhookDelivery.STATE_FAILED,
}


def event(item: Event) -> events_pb2.Event:
    message = events_pb2.Event(
        id=item.id, cursor=item.cursor, type=item.type, time=convert.timestamp(item.time)
    )
    field = PAYLOADS.get(item.type)
    if field is not None:
        json_format.ParseDict(dict(item.data), getattr(message, field), ignore_unknown_fields=True)
    return message


def endpoint(value: models.WebhookEndpoint) -> events_pb2.WebhookEndpoint:
    return events_pb2.WebhookEndpoint(
        id=value.id,
        url=value.url,
        event_types=list(value.event_types),
        description=value.description,
        disabled=value.disabled_time is not None,
        disabled_reason=value.disabled_reason,
        consecutive_failures=value.consecutive_failures,
        create_time=convert.timestamp(value.create_time),
        update_time=convert.timestamp(value.update_time),
    )


def delivery(value: models.WebhookDelivery) -> events_pb2.WebhookDelivery:
    message = events_pb2.WebhookDelivery(
        id=value.id,
        endpoint_id=value.endpoint_id,
        event_id=value.event_id,
        event_type=value.event_type,
        state=_STATES[value.state],
        create_time=convert.timestamp(value.create_time),
    )
    if value.next_attempt_time is not None:
        message.next_attempt_time.CopyFrom(convert.timestamp(value.next_attempt_time))
    for attempt in value.attempts:
        item = message.attempts.add(
            time=convert.timestamp(attempt.time), http_status=attempt.http_status, error=attempt.error
        )
        item.latency.FromMilliseconds(attempt.latency_ms)
    return message


def _check_times(given: events_pb2.WebhookEndpoint) -> None:
    """Output-only times sent anyway are ignored, but must still be valid Timestamps."""
    for name in ("create_time", "update_time"):
        if given.HasField(name):
            convert.to_datetime(getattr(given, name), f"webhook_endpoint.{name}")


class EventServicer(events_pb2_grpc.EventServiceServicer):
    def __init__(self, service: EventService, webhooks: WebhookService) -> None:
        self._service = service
        self._webhooks = webhooks

    async def CreateWebhookEndpoint(
        self, request: events_pb2.CreateWebhookEndpointRequest, context: object
    ) -> events_pb2.CreateWebhookEndpointResponse:
        given = request.webhook_endpoint
        _check_times(given)
        created, secret = await self._webhooks.create(
            current_principal(), given.url, list(given.event_types), given.description
        )
        return events_pb2.CreateWebhookEndpointResponse(webhook_endpoint=endpoint(created), secret=secret)

    async def ListWebhookEndpoints(
        self, request: events_pb2.ListWebhookEndpointsRequest, context: object
    ) -> events_pb2.ListWebhookEndpointsResponse:
        page = await self._webhooks.list(current_principal(), request.page_size, request.page_token)
        return events_pb2.ListWebhookEndpointsResponse(
            webhook_endpoints=[endpoint(item) for item in page.endpoints],
            next_page_token=page.next_page_token,
        )

    async def UpdateWebhookEndpoint(
        self, request: events_pb2.UpdateWebhookEndpointRequest, context: object
    ) -> events_pb2.UpdateWebhookEndpointResponse:
        given = request.webhook_endpoint
        _check_times(given)
        values = {
            "url": given.url,
            "event_types": list(given.event_types),
            "description": given.description,
            "disabled": given.disabled,
        }
        updated = await self._webhooks.update(
            current_principal(), request.endpoint_id, list(request.update_mask.paths), values
        )
        return events_pb2.UpdateWebhookEndpointResponse(webhook_endpoint=endpoint(updated))

    async def DeleteWebhookEndpoint(
        self, request: events_pb2.DeleteWebhookEndpointRequest, context: object
    ) -> events_pb2.DeleteWebhookEndpointResponse:
        await self._webhooks.delete(current_principal(), request.endpoint_id)
        return events_pb2.DeleteWebhookEndpointResponse()

    async def RotateWebhookSecret(
        self, request: events_pb2.RotateWebhookSecretRequest, context: object
    ) -> events_pb2.RotateWebhookSecretResponse:
        secret = await self._webhooks.rotate_secret(current_principal(), request.endpoint_id)
        return events_pb2.RotateWebhookSecretResponse(secret=secret)

    async def ListWebhookDeliveries(
        self, request: events_pb2.ListWebhookDeliveriesRequest, context: object
    ) -> events_pb2.ListWebhookDeliveriesResponse:
        page = await self._webhooks.deliveries(
            current_principal(), request.endpoint_id, request.page_size, request.page_token
        )
        return events_pb2.ListWebhookDeliveriesResponse(
            webhook_deliveries=[delivery(item) for item in page.deliveries],
            next_page_token=page.next_page_token,
        )

    async def RetryWebhookDelivery(
        self, request: events_pb2.RetryWebhookDeliveryRequest, context: object
    ) -> events_pb2.RetryWebhookDeliveryResponse:
        retried = await self._webhooks.retry(current_principal(), request.delivery_id)
        return events_pb2.RetryWebhookDeliveryResponse(webhook_delivery=delivery(retried))

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
