"""Enrichment adapters behind ``ProfileProvider``: Clearbit-compatible person lookup and People
Data Labs person enrichment.

Both send the email as an encoded query parameter and the key only in a header, with connect and
read timeouts and a circuit breaker per provider. They never raise for provider trouble; they
classify every answer:

============================  =========================================================
found / not found             200 with a person / 404 (PDL's and Clearbit's "no match")
retry later                   timeouts, connection errors, Clearbit's 202 (queued), 401,
                              402 (PDL out of credits), 403, 429, 5xx, malformed bodies
give up                       400 / 422 (the provider refuses this request for good)
============================  =========================================================

Only text fields are kept, trimmed to the column sizes, and the avatar only when it is an
``https`` URL.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

import httpx

from referral_service.domain.ports import PersonData, ProfileLookup, ProfileOutcome
from referral_service.integrations.http import retry_after
from referral_service.resilience import CircuitBreaker

log = logging.getLogger("referral_service.enrichment")

CLEARBIT_URL = "https://person.clearbit.com"
PEOPLEDATALABS_URL = "https://api.peopledatalabs.com"


def _text(value: object, limit: int = 200) -> str | None:
    if not isinstance(value, str):
        return None
    value = " ".join(value.split())
    return value[:limit] or None


def _https(value: object) -> str | None:
    text = _text(value, 2048)
    if text is None or not text.lower().startswith("https://") or len(text) <= len("https://"):
        return None
    return text


class _HttpProvider(ABC):
    name: str

    def __init__(
        self, client: httpx.AsyncClient, *, base_url: str, api_key: str, breaker: CircuitBreaker
    ) -> None:
        self._client = client
        self._base = base_url.rstrip("/")
        self._api_key = api_key
        self.breaker = breaker

    def __repr__(self) -> str:  # never show the key
        return f"{type(self).__name__}(base_url={self._base!r})"

    @abstractmethod
    def _request(self, email: str) -> tuple[str, dict[str, str], dict[str, str]]:
        """URL, query parameters, headers."""

    @abstractmethod
    def _person(self, body: Any) -> PersonData | None:
        """The person in a 200 body; None when the body is not what the provider sends."""

    def _retry(self, detail: str, response: httpx.Response | None = None) -> ProfileLookup:
        self.breaker.failure(detail)
        return ProfileLookup(
            ProfileOutcome.RETRY,
            detail=detail,
            retry_after_seconds=retry_after(response) if response else None,
        )

    def _status(self, response: httpx.Response) -> ProfileLookup | None:
        """Provider-specific answers to statuses other than 200/404; None for the defaults."""
        return None

    async def lookup(self, email: str) -> ProfileLookup:
        if not self.breaker.allow():
            return ProfileLookup(
                ProfileOutcome.RETRY, detail="circuit open", retry_after_seconds=self.breaker.retry_after()
            )
        url, params, headers = self._request(email)
        try:
            response = await self._client.get(url, params=params, headers=headers)
        except httpx.TimeoutException:
            return self._retry("timeout")
        except httpx.HTTPError as error:
            return self._retry(f"connection error ({type(error).__name__})")
        status = response.status_code
        special = self._status(response)
        if special is not None:
            return special
        if status == 200:
            try:
                person = self._person(response.json())
            except ValueError:
                person = None
            if person is None:
                return self._retry("malformed response")
            self.breaker.success()
            return ProfileLookup(
                ProfileOutcome.FOUND if not person.empty() else ProfileOutcome.NOT_FOUND, person=person
            )
        if status == 404:
            self.breaker.success()
            return ProfileLookup(ProfileOutcome.NOT_FOUND, detail="http 404")
        if status in (401, 403):
            log.error(
                "%s refused the API key (http %d): check REFERRAL_ENRICHMENT_API_KEY", self.name, status
            )
            return self._retry(f"http {status}", response)
        if status in (402, 429) or status >= 500:
            return self._retry(f"http {status}", response)
        if status in (400, 422):
            self.breaker.success()
            return ProfileLookup(ProfileOutcome.FAILED, detail=f"http {status}")
        return self._retry(f"http {status}", response)

    async def close(self) -> None:
        await self._client.aclose()


class ClearbitProvider(_HttpProvider):
    """Clearbit Person API (``GET /v2/people/find?email=``, ``Authorization: Bearer``), as
    still served to Clearbit / HubSpot Breeze Intelligence customers and compatible services."""

    name = "clearbit"

    def _request(self, email: str) -> tuple[str, dict[str, str], dict[str, str]]:
        return (
            f"{self._base}/v2/people/find",
            {"email": email},
            {"Authorization": f"Bearer {self._api_key}"},
        )

    def _status(self, response: httpx.Response) -> ProfileLookup | None:
        if response.status_code == 202:  # queued: the answer will be ready later
            self.breaker.success()
            return ProfileLookup(
                ProfileOutcome.RETRY, detail="http 202 (queued)", retry_after_seconds=retry_after(response)
            )
        return None

    def _person(self, body: Any) -> PersonData | None:
        if not isinstance(body, dict):
            return None
        name = body.get("name")
        name = name if isinstance(name, dict) else {}
        employment = body.get("employment")
        employment = employment if isinstance(employment, dict) else {}
        return PersonData(
            full_name=_text(name.get("fullName")),
            company=_text(employment.get("name")),
            title=_text(employment.get("title")),
            location=_text(body.get("location")),
            avatar_uri=_https(body.get("avatar")),
        )


class PeopleDataLabsProvider(_HttpProvider):
    """People Data Labs Person Enrichment (``GET /v5/person/enrich?email=``, ``X-Api-Key``)."""

    name = "peopledatalabs"

    def _request(self, email: str) -> tuple[str, dict[str, str], dict[str, str]]:
        return (
            f"{self._base}/v5/person/enrich",
            {"email": email, "titlecase": "true"},
            {"X-Api-Key": self._api_key},
        )

    def _person(self, body: Any) -> PersonData | None:
        if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
            return None
        data = body["data"]
        return PersonData(
            full_name=_text(data.get("full_name")),
            company=_text(data.get("job_company_name")),
            title=_text(data.get("job_title")),
            location=_text(data.get("location_name")),
            avatar_uri=None,  # PDL has no profile pictures
        )
