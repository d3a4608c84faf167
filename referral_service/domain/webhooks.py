"""Webhooks: endpoints that receive the events as signed HTTP POSTs.

``WebhookService`` manages endpoints and deliveries (services with ``webhooks:manage``, and
superusers). ``WebhookWorker`` runs in every process, in the background: it turns new events
into deliveries (``Webhooks.fan_out``: a cursor in the database, advanced in the transaction
that writes the deliveries) and sends the due ones (claimed with a lease, so a crashed worker's
deliveries are sent again after the lease). Everything is in the database: deliveries survive
restarts, and a user's call never waits for a receiver.

Signatures follow the Standard Webhooks specification: ``webhook-id`` (the event id, the same
on every attempt), ``webhook-timestamp`` (seconds), ``webhook-signature`` =
``v1,<base64 HMAC-SHA256(secret, "<id>.<timestamp>.<body>")>``, the secret being ``whsec_``
and base64 of 32 random bytes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from referral_service.domain import events
from referral_service.domain.backoff import backoff_delay
from referral_service.domain.clock import utcnow
from referral_service.domain.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Reason,
    check,
)
from referral_service.domain.models import (
    DELIVERY_FAILED,
    DELIVERY_PENDING,
    DueDelivery,
    Event,
    EventDraft,
    Principal,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)
from referral_service.domain.ports import Store, Webhooks, WebhookSender
from referral_service.domain.tasks import BackgroundTask

log = logging.getLogger("referral_service.webhooks")

SECRET_PREFIX = "whsec_"
_URL_MAX = 2048
_DESCRIPTION_MAX = 500
#: The fields UpdateWebhookEndpoint may change.
UPDATABLE = frozenset({"url", "event_types", "description", "disabled"})


# --- signing ---------------------------------------------------------------------------------


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one message (Standard Webhooks ``v1``)."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def webhook_body(event_id: str, event_type: str, time: datetime, data: Mapping[str, object]) -> str:
    """The JSON body of a webhook: ``{"type", "timestamp", "id", "data"}`` (``data``: the
    payload message in proto JSON names, as ListEvents shows it)."""
    return json.dumps(
        {
            "type": event_type,
            "timestamp": time.isoformat().replace("+00:00", "Z"),
            "id": event_id,
            "data": {_camel(key): value for key, value in data.items()},
        },
        separators=(",", ":"),
    )


def _body(event: Event) -> str:
    return webhook_body(event.id, event.type, event.time, event.data)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


# --- URLs (SSRF) -----------------------------------------------------------------------------


def forbidden_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Addresses a webhook may never reach unless the server allows private targets."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_global or address.is_multicast


def url_violations(field: str, url: str, *, allow_private: bool) -> list[FieldViolation]:
    if not url:
        return [FieldViolation(field, "is required", "REQUIRED")]
    if len(url) > _URL_MAX:
        return [FieldViolation(field, f"must be at most {_URL_MAX} characters", "TOO_LONG")]
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        _ = parts.port
    except ValueError:
        return [FieldViolation(field, "is not a valid URL", "INVALID")]
    if parts.scheme not in ("https", "http") or not host:
        return [FieldViolation(field, "must be an absolute https URL", "INVALID")]
    if parts.username or parts.password:
        return [FieldViolation(field, "must not carry credentials", "INVALID")]
    if allow_private:
        return []
    if parts.scheme != "https":
        return [FieldViolation(field, "must use https", Reason.WEBHOOK_URL_FORBIDDEN.value)]
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    lowered = host.lower().rstrip(".")
    if (
        (literal is not None and forbidden_address(literal))
        or lowered == "localhost"
        or lowered.endswith((".localhost", ".local", ".internal"))
    ):
        return [
            FieldViolation(
                field, "must not point at a private or loopback address", Reason.WEBHOOK_URL_FORBIDDEN.value
            )
        ]
    return []


def _raise_url(violations: list[FieldViolation]) -> None:
    if any(v.reason == Reason.WEBHOOK_URL_FORBIDDEN.value for v in violations):
        raise InvalidArgument(
            Reason.WEBHOOK_URL_FORBIDDEN,
            "; ".join(f"{v.field}: {v.description}" for v in violations),
            violations=violations,
        )
    check(violations)


# --- management ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EndpointPage:
    endpoints: list[WebhookEndpoint]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class DeliveryPage:
    deliveries: list[WebhookDelivery]
    next_page_token: str


def _token(value: int) -> str:
    return base64.urlsafe_b64encode(f"wh1:{value}".encode()).decode().rstrip("=")


def _from_token(token: str) -> int:
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        if not text.startswith("wh1:"):
            raise ValueError(text)
        return int(text[4:])
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise InvalidArgument(
            Reason.INVALID_PAGE_TOKEN, "the page_token is not one this server issued"
        ) from None


class WebhookService:
    def __init__(
        self,
        store: Store,
        webhooks: Webhooks,
        *,
        allow_private: bool = False,
        on_endpoints_changed: Callable[[], None] | None = None,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self._webhooks = webhooks
        self._allow_private = allow_private
        self._changed = on_endpoints_changed or (lambda: None)
        self._now = now

    async def _admit(self, principal: Principal) -> None:
        """Services reach here holding ``webhooks:manage`` (the pipeline checks); users must be
        superusers."""
        if principal.is_service:
            return
        async with self._store.read() as uow:
            user = await uow.users.get(principal.user_id)
        if user is None or not user.is_superuser or not user.is_active:
            raise PermissionDenied(
                Reason.PERMISSION_DENIED,
                "managing webhooks needs a superuser, or a service token with the scope 'webhooks:manage'",
            )

    def _check_types(self, field: str, types: Sequence[str]) -> list[FieldViolation]:
        unknown = sorted(set(types) - events.TYPES)
        return [FieldViolation(field, f"unknown event type {name!r}", "UNKNOWN_TYPE") for name in unknown[:5]]

    async def create(
        self, principal: Principal, url: str, event_types: Sequence[str], description: str
    ) -> tuple[WebhookEndpoint, str]:
        await self._admit(principal)
        violations = url_violations("webhook_endpoint.url", url, allow_private=self._allow_private)
        violations += self._check_types("webhook_endpoint.event_types", event_types)
        if len(description) > _DESCRIPTION_MAX:
            violations.append(
                FieldViolation(
                    "webhook_endpoint.description",
                    f"must be at most {_DESCRIPTION_MAX} characters",
                    "TOO_LONG",
                )
            )
        _raise_url(violations)
        secret = new_secret()
        endpoint = await self._webhooks.add_endpoint(
            url=url,
            event_types=sorted(set(event_types)),
            description=description,
            secret=secret,
            now=self._now(),
        )
        log.info("webhook endpoint created", extra={"endpoint_id": endpoint.id})
        self._changed()
        return endpoint, secret

    async def list(self, principal: Principal, page_size: int, page_token: str) -> EndpointPage:
        await self._admit(principal)
        if page_size < 0:
            raise InvalidArgument.fields(FieldViolation("page_size", "must not be negative", "OUT_OF_RANGE"))
        limit = min(page_size or 50, 200)
        after = _from_token(page_token) if page_token else 0
        found = await self._webhooks.endpoints(after, limit + 1)
        more = len(found) > limit
        found = found[:limit]
        return EndpointPage(found, _token(found[-1].id) if more else "")

    async def _endpoint(self, endpoint_id: int) -> WebhookEndpoint:
        endpoint = await self._webhooks.endpoint(endpoint_id) if endpoint_id > 0 else None
        if endpoint is None:
            raise NotFound(Reason.WEBHOOK_ENDPOINT_NOT_FOUND, f"no webhook endpoint with id {endpoint_id}")
        return endpoint

    async def update(
        self, principal: Principal, endpoint_id: int, paths: Sequence[str], values: Mapping[str, object]
    ) -> WebhookEndpoint:
        await self._admit(principal)
        unknown = sorted(set(paths) - UPDATABLE)
        violations = [
            FieldViolation(
                "update_mask", f"{path!r} cannot be changed (only {', '.join(sorted(UPDATABLE))})", "INVALID"
            )
            for path in unknown
        ]
        if not paths:
            violations.append(FieldViolation("update_mask", "name the fields to change", "REQUIRED"))
        changes: dict[str, object] = {}
        now = self._now()
        if "url" in paths:
            url = str(values["url"])
            violations += url_violations("webhook_endpoint.url", url, allow_private=self._allow_private)
            changes["url"] = url
        if "event_types" in paths:
            types = [str(t) for t in values["event_types"]]  # type: ignore[attr-defined]
            violations += self._check_types("webhook_endpoint.event_types", types)
            changes["event_types"] = sorted(set(types))
        if "description" in paths:
            description = str(values["description"])
            if len(description) > _DESCRIPTION_MAX:
                violations.append(FieldViolation("webhook_endpoint.description", "too long", "TOO_LONG"))
            changes["description"] = description
        _raise_url(violations)
        current = await self._endpoint(endpoint_id)
        if "disabled" in paths:
            if values["disabled"] and current.disabled_time is None:
                changes.update(disabled_time=now, disabled_reason="operator")
            elif not values["disabled"] and current.disabled_time is not None:
                changes.update(disabled_time=None, disabled_reason="", consecutive_failures=0)
        updated = await self._webhooks.update_endpoint(endpoint_id, changes, now)
        if updated is None:
            raise NotFound(Reason.WEBHOOK_ENDPOINT_NOT_FOUND, f"no webhook endpoint with id {endpoint_id}")
        self._changed()
        return updated

    async def delete(self, principal: Principal, endpoint_id: int) -> None:
        await self._admit(principal)
        if endpoint_id <= 0 or not await self._webhooks.delete_endpoint(endpoint_id):
            raise NotFound(Reason.WEBHOOK_ENDPOINT_NOT_FOUND, f"no webhook endpoint with id {endpoint_id}")

    async def rotate_secret(self, principal: Principal, endpoint_id: int) -> str:
        await self._admit(principal)
        secret = new_secret()
        if endpoint_id <= 0 or not await self._webhooks.set_secret(endpoint_id, secret, self._now()):
            raise NotFound(Reason.WEBHOOK_ENDPOINT_NOT_FOUND, f"no webhook endpoint with id {endpoint_id}")
        return secret

    async def deliveries(
        self, principal: Principal, endpoint_id: int, page_size: int, page_token: str
    ) -> DeliveryPage:
        await self._admit(principal)
        if page_size < 0:
            raise InvalidArgument.fields(FieldViolation("page_size", "must not be negative", "OUT_OF_RANGE"))
        await self._endpoint(endpoint_id)
        limit = min(page_size or 50, 200)
        before = _from_token(page_token) if page_token else None
        found = await self._webhooks.deliveries(endpoint_id, before, limit + 1)
        more = len(found) > limit
        found = found[:limit]
        return DeliveryPage(found, _token(found[-1].id) if more else "")

    async def retry(self, principal: Principal, delivery_id: int) -> WebhookDelivery:
        await self._admit(principal)
        delivery = await self._webhooks.delivery(delivery_id) if delivery_id > 0 else None
        if delivery is None:
            raise NotFound(Reason.WEBHOOK_DELIVERY_NOT_FOUND, f"no webhook delivery with id {delivery_id}")
        endpoint = await self._endpoint(delivery.endpoint_id)
        if endpoint.disabled_time is not None:
            raise FailedPrecondition(
                Reason.WEBHOOK_ENDPOINT_DISABLED,
                "the delivery's endpoint is disabled: enable it (UpdateWebhookEndpoint) first",
            )
        retried = await self._webhooks.retry(delivery_id, self._now())
        if retried is None:
            raise NotFound(Reason.WEBHOOK_DELIVERY_NOT_FOUND, f"no webhook delivery with id {delivery_id}")
        self._changed()
        return retried


# --- delivery --------------------------------------------------------------------------------


def endpoint_disabled(endpoint: WebhookEndpoint) -> EventDraft:
    return EventDraft(
        events.WEBHOOK_ENDPOINT_DISABLED,
        {
            "endpoint_id": endpoint.id,
            "url": endpoint.url,
            "consecutive_failures": endpoint.consecutive_failures,
        },
    )


class WebhookWorker(BackgroundTask):
    """Fans events out into deliveries and sends the due ones, in the background."""

    task_name = "webhooks"

    def __init__(
        self,
        webhooks: Webhooks,
        sender: WebhookSender,
        *,
        max_attempts: int = 14,
        retry_base: timedelta = timedelta(seconds=30),
        retry_max: timedelta = timedelta(hours=4),
        disable_after: int = 30,
        poll_seconds: float = 30.0,
        concurrency: int = 8,
        lease: timedelta = timedelta(minutes=2),
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self._webhooks = webhooks
        self.sender = sender
        self._max_attempts = max_attempts
        self._retry_base = retry_base.total_seconds()
        self._retry_max = retry_max.total_seconds()
        self._disable_after = disable_after
        self._poll = poll_seconds
        self._concurrency = concurrency
        self._lease = lease
        self._now = now
        self._wake = asyncio.Event()
        self._task = None
        #: Whether any endpoint exists, as last read (at most ``poll_seconds`` ago, or since this
        #: process changed one): without endpoints a round touches no database at all.
        self._has_endpoints = True
        self._endpoints_checked = float("-inf")

    def notify(self) -> None:
        """Events were committed: look now."""
        self._wake.set()

    def endpoints_changed(self) -> None:
        """An endpoint was created or changed here: read again, and look now."""
        self._endpoints_checked = float("-inf")
        self._wake.set()

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                await self.run_once()
            except Exception:
                # Once per outage (the database down, say), not every poll.
                if not failing:
                    log.warning("webhook delivery round failed; retrying", exc_info=True)
                failing = True
            else:
                if failing:
                    log.info("webhook deliveries resumed")
                failing = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), await self._idle_seconds(failing))
            self._wake.clear()

    async def _idle_seconds(self, failing: bool) -> float:
        """Until the next delivery is due (a retry, a lease ending), at most the poll interval.
        Commits wake the worker at once (here, or through NOTIFY), so an idle service does not
        query the database every second."""
        if failing or self._wake.is_set() or not self._has_endpoints:
            return 0.0 if self._wake.is_set() and not failing else self._poll
        try:
            due = await self._webhooks.next_due_time()
        except Exception:
            return self._poll
        if due is None:
            return self._poll
        return min(self._poll, max((due - self._now()).total_seconds(), 0.05))

    async def run_once(self) -> int:
        """One round: fan out new events, send the due deliveries; how many were sent."""
        clock = asyncio.get_running_loop().time()
        if clock - self._endpoints_checked >= self._poll:
            self._has_endpoints = bool(await self._webhooks.endpoints(0, 1))
            self._endpoints_checked = clock
        if not self._has_endpoints:
            return 0
        now = self._now()
        while await self._webhooks.fan_out(now, 500, _body) == 500:
            pass
        due = await self._webhooks.claim_due(now, now + self._lease, self._concurrency)
        if due:
            await asyncio.gather(*(self._send(item) for item in due))
            self._wake.set()  # there may be more
        return len(due)

    async def _send(self, item: DueDelivery) -> None:
        sent = self._now()
        timestamp = int(sent.timestamp())
        body = item.body.encode()
        headers = {
            "content-type": "application/json",
            "user-agent": "referral-service-webhooks/1",
            "webhook-id": item.event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(item.secret, item.event_id, timestamp, body),
        }
        response = await self.sender.post(item.url, headers, body)
        succeeded = not response.error and 200 <= response.status < 300
        attempt = WebhookAttempt(
            sent,
            response.status,
            response.latency_ms,
            response.error or ("" if succeeded else f"http {response.status}"),
        )
        attempts = item.attempt_count + 1
        next_time = None
        if not succeeded and attempts < self._max_attempts:
            next_time = self._now() + timedelta(
                seconds=backoff_delay(attempts, self._retry_base, self._retry_max)
            )
        disabled = await self._webhooks.record(
            item,
            attempt,
            succeeded=succeeded,
            next_attempt_time=next_time,
            disable_after=self._disable_after,
            disabled_event=endpoint_disabled,
            now=self._now(),
        )
        if disabled:
            log.warning(
                "webhook endpoint disabled after repeated failures", extra={"endpoint_id": item.endpoint_id}
            )


__all__ = ["DELIVERY_FAILED", "DELIVERY_PENDING", "WebhookService", "WebhookWorker"]
