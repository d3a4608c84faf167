"""Recorded-shape answers of the vendors, served by ``FakeHttp``.

Hunter's scenario is chosen by the first word of the email's local part (``valid-x@...``,
``s429.y@...``), so one fake serves a whole test.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from tests.fake_http import Request, Response

HUNTER_KEY = "hk_test_5f1c9e7a2b4d4b0c9d"
ENRICHMENT_KEY = "ek_test_0a8b6c4d2e1f3a5b7c"


def hunter_data(email: str, status: str, result: str, **flags: Any) -> dict[str, Any]:
    data = {
        "status": status,
        "result": result,
        "_deprecation_notice": "Using result is deprecated, use status instead",
        "score": 100 if status == "valid" else 50,
        "email": email,
        "regexp": True,
        "gibberish": False,
        "disposable": status == "disposable",
        "webmail": status == "webmail",
        "mx_records": True,
        "smtp_server": True,
        "smtp_check": status == "valid",
        "accept_all": status == "accept_all",
        "block": False,
        "sources": [],
    }
    data.update(flags)
    return {"data": data, "meta": {"params": {"email": email}}}


def hunter_error(code: int, ident: str, details: str) -> dict[str, Any]:
    return {"errors": [{"id": ident, "code": code, "details": details}]}


class Hunter:
    """Plays ``GET /v2/email-verifier``."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()

    def scenario(self, email: str) -> str:
        return re.split(r"[-+.&=_]", email.split("@")[0].lower(), maxsplit=1)[0]

    def __call__(self, request: Request) -> Response:
        if request.path != "/v2/email-verifier":
            return Response(404, hunter_error(404, "not_found", "unknown endpoint"))
        email = request.param("email")
        self.seen[email] += 1
        scenario = self.scenario(email)
        # data.status decides; the deprecated `result` deliberately disagrees where it could
        # mislead a client that reads it (webmail and accept_all are "risky" there).
        statuses = {
            "valid": ("valid", "deliverable"),
            "tom": ("valid", "deliverable"),
            "invalid": ("invalid", "undeliverable"),
            "disposable": ("disposable", "deliverable"),
            "webmail": ("webmail", "risky"),
            "acceptall": ("accept_all", "risky"),
            "unknown": ("unknown", "risky"),
            "weird": ("something_new", "deliverable"),
        }
        if scenario in statuses:
            return Response(200, hunter_data(email, *statuses[scenario]))
        if scenario == "later":  # 202 first, then the answer
            if self.seen[email] == 1:
                return Response(202, hunter_error(202, "verification_in_progress", "retry shortly"))
            return Response(200, hunter_data(email, "valid", "deliverable"))
        if scenario == "s202":
            return Response(202, hunter_error(202, "verification_in_progress", "retry shortly"))
        if scenario == "s222":
            return Response(
                222,
                hunter_error(222, "smtp_failure", "unexpected response from the remote SMTP server"),
            )
        if scenario == "s401":
            return Response(401, hunter_error(401, "authentication_failed", "No user found for the API key"))
        if scenario == "s403":
            return Response(403, hunter_error(403, "restricted_account", "Your account is restricted"))
        if scenario == "s429":
            return Response(
                429,
                hunter_error(429, "too_many_requests", "You have reached your usage limit"),
                {"Retry-After": "7"},
            )
        if scenario == "s500":
            return Response(500, hunter_error(500, "internal_error", "Something went wrong"))
        if scenario == "hang":
            return Response(hang=True)
        if scenario == "malformed":
            return Response(200, '{"data": {"status": "val')
        if scenario == "nodata":
            return Response(200, {"data": None, "meta": {}})
        if scenario == "other":  # an answer about a different address
            return Response(200, hunter_data("someone.else@example.com", "valid", "deliverable"))
        raise AssertionError(f"no Hunter scenario {scenario!r}")


# --- enrichment ----------------------------------------------------------------------------------

PDL_PERSON = {
    "status": 200,
    "likelihood": 9,
    "data": {
        "id": "qEnOZ5Oh0poWnQ1luFBfVw_0000",
        "full_name": "Ada Lovelace",
        "first_name": "Ada",
        "last_name": "Lovelace",
        "job_title": "Principal Analyst",
        "job_company_name": "Analytical Engines",
        "location_name": "London, England, United Kingdom",
        "linkedin_url": "linkedin.com/in/ada",
        "emails": [{"address": "ada@example.com", "type": "professional"}],
    },
    "dataset_version": "29.0",
}

CLEARBIT_PERSON = {
    "id": "d54c54ad-40be-4305-8a34-0ab44710b90d",
    "name": {"fullName": "Grace Hopper", "givenName": "Grace", "familyName": "Hopper"},
    "email": "grace@example.com",
    "location": "Arlington, VA, US",
    "geo": {"city": "Arlington", "state": "Virginia", "country": "United States"},
    "bio": "Rear admiral",
    "avatar": "https://images.example.com/grace.png",
    "employment": {"domain": "navy.mil", "name": "US Navy", "title": "Rear Admiral"},
}


class Enrichment:
    """Plays PDL ``/v5/person/enrich`` and Clearbit ``/v2/people/find``; the scenario is the
    first word of the email's local part: ``found``, ``later`` (queued/500 once, then found),
    ``missing`` (404), ``s500``, ``malformed``, ``s402``, ``s429``, ``hang``, ``empty``."""

    def __init__(self, vendor: str) -> None:
        self.vendor = vendor
        self.seen: Counter[str] = Counter()

    def __call__(self, request: Request) -> Response:
        expected = "/v5/person/enrich" if self.vendor == "peopledatalabs" else "/v2/people/find"
        if request.path != expected:
            return Response(404, {"error": "unknown endpoint"})
        email = request.param("email")
        self.seen[email] += 1
        scenario = re.split(r"[-+.]", email.split("@")[0].lower(), maxsplit=1)[0]
        pdl = self.vendor == "peopledatalabs"
        found = Response(200, PDL_PERSON if pdl else CLEARBIT_PERSON)
        if scenario == "found":
            return found
        if scenario == "later":
            if self.seen[email] == 1:
                return Response(500, {"error": {"type": "error"}}) if pdl else Response(202, {})
            return found
        if scenario == "missing":
            return Response(
                404,
                {"status": 404, "error": {"type": "not_found", "message": "No records were found"}}
                if pdl
                else {"error": {"type": "unknown_record", "message": "Unknown email address"}},
            )
        if scenario == "empty":
            return Response(200, {"status": 200, "likelihood": 2, "data": {}} if pdl else {"name": {}})
        if scenario == "s500":
            return Response(500, {"error": {"type": "error", "message": "internal"}})
        if scenario == "s402":
            return Response(402, {"status": 402, "error": {"type": "payment_required", "message": "quota"}})
        if scenario == "s429":
            return Response(429, {"status": 429, "error": {"type": "rate_limit"}}, {"Retry-After": "0"})
        if scenario == "malformed":
            return Response(200, "<html>gateway</html>")
        if scenario == "hang":
            return Response(hang=True)
        raise AssertionError(f"no enrichment scenario {scenario!r}")
