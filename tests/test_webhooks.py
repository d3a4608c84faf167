"""Webhooks (issue 18), through the wire: endpoints managed over gRPC, deliveries signed per
Standard Webhooks (verified with the reference ``standardwebhooks`` package) to a real loopback
receiver, retries with back-off, a dead endpoint disabled, manual retry, SSRF refusals, and
delivery after a restart."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import grpc
import pytest
import standardwebhooks
from google.protobuf import field_mask_pb2
from referral.v1 import events_pb2, events_pb2_grpc

from tests.conftest import PASSWORD, Api, Stack, bearer, start_api, stop_api
from tests.errors import expect_error
from tests.fake_http import FakeHttp, Request, Response
from tests.test_service_accounts import service_token

DEADLINE = 30.0
FAST = {
    "webhooks_allow_private": True,
    "webhooks_retry_backoff": timedelta(milliseconds=20),
    "webhooks_retry_max": timedelta(milliseconds=100),
    "webhooks_poll_seconds": 0.05,
    "webhooks_disable_after_failures": 4,
}
Delivery = events_pb2.WebhookDelivery


@pytest.fixture
async def hooks_api(stack: Stack) -> AsyncIterator[Api]:
    api = await start_api(stack, **FAST)
    try:
        yield api
    finally:
        await stop_api(api)


class Receiver:
    """A loopback receiver answering with ``statuses`` in turn (then 200)."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.server = FakeHttp(self._answer)

    def _answer(self, request: Request) -> Response:
        return Response(self.statuses.pop(0) if self.statuses else 200, {})

    async def __aenter__(self) -> Receiver:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.close()

    @property
    def url(self) -> str:
        return self.server.url + "/hooks"


async def manager(api: Api) -> tuple[events_pb2_grpc.EventServiceStub, tuple[tuple[str, str], ...]]:
    return events_pb2_grpc.EventServiceStub(api.channel), bearer(await service_token(api, "webhooks:manage"))


async def until(check: Callable[[], Any], what: str) -> Any:
    """Poll ``check`` (async) until it returns something truthy, within the deadline."""
    async with asyncio.timeout(DEADLINE):
        while True:
            found = await check()
            if found:
                return found
            await asyncio.sleep(0.05)
    raise AssertionError(what)  # pragma: no cover


async def test_signed_delivery_retried_until_it_succeeds(hooks_api: Api) -> None:
    api = hooks_api
    stub, metadata = await manager(api)
    async with Receiver([500, 503, 500]) as receiver:
        created = await stub.CreateWebhookEndpoint(
            events_pb2.CreateWebhookEndpointRequest(
                webhook_endpoint=events_pb2.WebhookEndpoint(
                    url=receiver.url, event_types=["user.registered"], description="crm"
                )
            ),
            metadata=metadata,
        )
        endpoint, secret = created.webhook_endpoint, created.secret
        assert secret.startswith("whsec_")
        assert endpoint.id > 0
        assert list(endpoint.event_types) == ["user.registered"]
        user = await api.register()

        async def succeeded() -> list[Delivery]:
            page = await stub.ListWebhookDeliveries(
                events_pb2.ListWebhookDeliveriesRequest(endpoint_id=endpoint.id), metadata=metadata
            )
            done = [d for d in page.webhook_deliveries if d.state == Delivery.STATE_SUCCEEDED]
            return list(page.webhook_deliveries) if done else []

        (delivery,) = await until(succeeded, "the delivery never succeeded")
        assert [a.http_status for a in delivery.attempts] == [500, 503, 500, 200]
        assert delivery.event_type == "user.registered"
        assert all(a.latency.ToMilliseconds() >= 0 for a in delivery.attempts)
        requests = receiver.server.requests
        assert len(requests) == 4
        verifier = standardwebhooks.Webhook(secret)
        for request in requests:
            assert request.method == "POST"
            assert request.headers["webhook-id"] == delivery.event_id
            payload = verifier.verify(request.body, request.headers)
            assert payload["type"] == "user.registered"
            assert payload["data"]["userId"] == user.id
        # A wrong secret does not verify.
        with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
            standardwebhooks.Webhook("whsec_" + "A" * 43 + "=").verify(requests[0].body, requests[0].headers)
        # Other event types are not sent to it.
        await stub.RotateWebhookSecret(
            events_pb2.RotateWebhookSecretRequest(endpoint_id=endpoint.id), metadata=metadata
        )
        assert json.loads(requests[-1].body)["id"] == delivery.event_id


async def test_dead_endpoint_is_disabled_then_retried_by_hand(hooks_api: Api) -> None:
    api = hooks_api
    stub, metadata = await manager(api)
    async with Receiver([500] * 4) as receiver:
        endpoint = (
            await stub.CreateWebhookEndpoint(
                events_pb2.CreateWebhookEndpointRequest(
                    webhook_endpoint=events_pb2.WebhookEndpoint(url=receiver.url)
                ),
                metadata=metadata,
            )
        ).webhook_endpoint
        await api.register()

        async def disabled() -> events_pb2.WebhookEndpoint | None:
            page = await stub.ListWebhookEndpoints(
                events_pb2.ListWebhookEndpointsRequest(), metadata=metadata
            )
            (found,) = [e for e in page.webhook_endpoints if e.id == endpoint.id]
            return found if found.disabled else None

        dead = await until(disabled, "the endpoint was never disabled")
        assert dead.disabled_reason == "failures"
        assert dead.consecutive_failures == 4
        # The disabling is an event too.
        reader = bearer(await service_token(api, "events:read"))
        listed = await stub.ListEvents(
            events_pb2.ListEventsRequest(types=["webhook_endpoint.disabled"]), metadata=reader
        )
        assert [e.webhook_endpoint_disabled.endpoint_id for e in listed.events] == [endpoint.id]
        (delivery,) = (
            await stub.ListWebhookDeliveries(
                events_pb2.ListWebhookDeliveriesRequest(endpoint_id=endpoint.id), metadata=metadata
            )
        ).webhook_deliveries
        assert delivery.state == Delivery.STATE_PENDING
        assert len(delivery.attempts) == 4
        await expect_error(
            stub.RetryWebhookDelivery(
                events_pb2.RetryWebhookDeliveryRequest(delivery_id=delivery.id), metadata=metadata
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "WEBHOOK_ENDPOINT_DISABLED",
        )
        enabled = await stub.UpdateWebhookEndpoint(
            events_pb2.UpdateWebhookEndpointRequest(
                endpoint_id=endpoint.id,
                webhook_endpoint=events_pb2.WebhookEndpoint(disabled=False),
                update_mask=field_mask_pb2.FieldMask(paths=["disabled"]),
            ),
            metadata=metadata,
        )
        assert not enabled.webhook_endpoint.disabled
        assert enabled.webhook_endpoint.consecutive_failures == 0
        await stub.RetryWebhookDelivery(
            events_pb2.RetryWebhookDeliveryRequest(delivery_id=delivery.id), metadata=metadata
        )

        async def delivered() -> bool:
            page = await stub.ListWebhookDeliveries(
                events_pb2.ListWebhookDeliveriesRequest(endpoint_id=endpoint.id), metadata=metadata
            )
            return page.webhook_deliveries[0].state == Delivery.STATE_SUCCEEDED

        await until(delivered, "the retried delivery never succeeded")
        await stub.DeleteWebhookEndpoint(
            events_pb2.DeleteWebhookEndpointRequest(endpoint_id=endpoint.id), metadata=metadata
        )
        await expect_error(
            stub.ListWebhookDeliveries(
                events_pb2.ListWebhookDeliveriesRequest(endpoint_id=endpoint.id), metadata=metadata
            ),
            grpc.StatusCode.NOT_FOUND,
            "WEBHOOK_ENDPOINT_NOT_FOUND",
        )


async def test_delivered_after_a_restart(stack: Stack) -> None:
    first = await start_api(stack, **FAST)
    async with Receiver() as receiver:
        try:
            stub, metadata = await manager(first)
            await stub.CreateWebhookEndpoint(
                events_pb2.CreateWebhookEndpointRequest(
                    webhook_endpoint=events_pb2.WebhookEndpoint(url=receiver.url)
                ),
                metadata=metadata,
            )
            # The server goes down between the change and its delivery.
            await first.app.services.webhook_worker.stop()
            user = await first.register()
        finally:
            await stop_api(first)
        assert receiver.server.requests == []
        second = await start_api(stack, **FAST)
        try:

            async def arrived() -> list[Request]:
                return receiver.server.requests

            (request,) = await until(arrived, "nothing was delivered after the restart")
            assert json.loads(request.body)["data"]["userId"] == user.id
        finally:
            await stop_api(second)


async def test_who_may_manage_and_forbidden_urls(api: Api) -> None:
    stub = events_pb2_grpc.EventServiceStub(api.channel)
    _, user_token = await api.user_with_token()
    request = events_pb2.CreateWebhookEndpointRequest(
        webhook_endpoint=events_pb2.WebhookEndpoint(url="https://hooks.example.com/in")
    )
    await expect_error(
        stub.CreateWebhookEndpoint(request, metadata=bearer(user_token)),
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )
    await expect_error(
        stub.CreateWebhookEndpoint(request, metadata=bearer(await service_token(api, "events:read"))),
        grpc.StatusCode.PERMISSION_DENIED,
        "SCOPE_MISSING",
    )
    email = api.unique_email("admin")
    await api.app.auth.create_superuser(email, PASSWORD)
    admin = bearer((await api.login(email)).access_token)
    created = await stub.CreateWebhookEndpoint(request, metadata=admin)
    assert created.webhook_endpoint.url == "https://hooks.example.com/in"
    for url in (
        "http://hooks.example.com/in",
        "https://127.0.0.1/in",
        "https://10.1.2.3/in",
        "https://[::1]/in",
        "https://169.254.169.254/latest",
        "https://localhost:8443/in",
    ):
        error = await expect_error(
            stub.CreateWebhookEndpoint(
                events_pb2.CreateWebhookEndpointRequest(webhook_endpoint=events_pb2.WebhookEndpoint(url=url)),
                metadata=admin,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "WEBHOOK_URL_FORBIDDEN",
        )
        assert list(error.fields) == ["webhook_endpoint.url"], url
    error = await expect_error(
        stub.CreateWebhookEndpoint(
            events_pb2.CreateWebhookEndpointRequest(
                webhook_endpoint=events_pb2.WebhookEndpoint(url="", event_types=["nope"])
            ),
            metadata=admin,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    )
    assert set(error.fields) == {"webhook_endpoint.url", "webhook_endpoint.event_types"}
    for call in (
        stub.DeleteWebhookEndpoint(events_pb2.DeleteWebhookEndpointRequest(endpoint_id=999), metadata=admin),
        stub.RotateWebhookSecret(events_pb2.RotateWebhookSecretRequest(endpoint_id=999), metadata=admin),
    ):
        await expect_error(call, grpc.StatusCode.NOT_FOUND, "WEBHOOK_ENDPOINT_NOT_FOUND")
    await expect_error(
        stub.RetryWebhookDelivery(events_pb2.RetryWebhookDeliveryRequest(delivery_id=5), metadata=admin),
        grpc.StatusCode.NOT_FOUND,
        "WEBHOOK_DELIVERY_NOT_FOUND",
    )
    await expect_error(
        stub.UpdateWebhookEndpoint(
            events_pb2.UpdateWebhookEndpointRequest(
                endpoint_id=created.webhook_endpoint.id,
                webhook_endpoint=events_pb2.WebhookEndpoint(url="https://192.168.0.1/"),
                update_mask=field_mask_pb2.FieldMask(paths=["url"]),
            ),
            metadata=admin,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "WEBHOOK_URL_FORBIDDEN",
    )


async def test_redirects_are_never_followed(hooks_api: Api) -> None:
    api = hooks_api
    stub, metadata = await manager(api)
    async with Receiver() as target:
        redirecting = FakeHttp(lambda request: Response(302, "", {"location": target.url}))
        await redirecting.start()
        try:
            endpoint = (
                await stub.CreateWebhookEndpoint(
                    events_pb2.CreateWebhookEndpointRequest(
                        webhook_endpoint=events_pb2.WebhookEndpoint(url=redirecting.url + "/hooks")
                    ),
                    metadata=metadata,
                )
            ).webhook_endpoint
            await api.register()

            async def attempted() -> list[events_pb2.WebhookAttempt]:
                page = await stub.ListWebhookDeliveries(
                    events_pb2.ListWebhookDeliveriesRequest(endpoint_id=endpoint.id), metadata=metadata
                )
                return list(page.webhook_deliveries[0].attempts) if page.webhook_deliveries else []

            first = (await until(attempted, "no attempt was made"))[0]
            assert first.http_status == 302
            assert "redirect" in first.error
            assert target.server.requests == []
        finally:
            await redirecting.close()
