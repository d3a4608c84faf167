"""The text access line says each thing once (the message names the method, code and duration;
the key=value pairs the rest, values with spaces quoted); a JSON line has every field."""

from __future__ import annotations

import json
import logging
import time

import pytest

from referral_service.logs import JsonFormatter, TextFormatter
from referral_service.pipeline.call import Call
from referral_service.pipeline.context import log_access


def _record(
    caplog: pytest.LogCaptureFixture, call: Call, http_status: int | None = None
) -> logging.LogRecord:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="referral_service.access"):
        log_access(call, http_status)
    (record,) = caplog.records
    return record


def test_the_text_access_line_says_each_thing_once(caplog: pytest.LogCaptureFixture) -> None:
    grpc_call = Call(
        "/referral.v1.ReferralService/GetReferralCodeByEmail",
        "grpc",
        "req-1",
        "ipv4:127.0.0.1:5555",
        time.perf_counter(),
    )
    grpc_call.code, grpc_call.reason = 5, "REFERRAL_CODE_NOT_FOUND"
    line = TextFormatter().format(_record(caplog, grpc_call))
    message = line.split(": ", 1)[1]
    assert message.startswith("/referral.v1.ReferralService/GetReferralCodeByEmail NOT_FOUND ")
    for word in ("GetReferralCodeByEmail", "NOT_FOUND", "ms"):
        assert message.count(word) == 1 + (word == "NOT_FOUND"), (word, message)  # the reason names it too
    assert "duration_ms=" not in message
    assert "method=" not in message
    assert "code=" not in message
    assert " request_id=req-1 peer=ipv4:127.0.0.1:5555 transport=grpc" in message

    http_call = Call("", "http", "req-2", "ipv4:127.0.0.1:5556", time.perf_counter(), route="GET (no route)")
    http_call.code = 5
    line = TextFormatter().format(_record(caplog, http_call, 404))
    message = line.split(": ", 1)[1]
    assert message.startswith("GET (no route) NOT_FOUND ")
    assert "route=" not in message  # in the message already
    assert "http_status=404" in message

    rpc_over_http = Call(
        "/referral.v1.AuthService/GetCurrentUser",
        "http",
        "req-3",
        "ipv4:127.0.0.1:5557",
        time.perf_counter(),
        route="GET /v1/users/me",
    )
    message = TextFormatter().format(_record(caplog, rpc_over_http, 200)).split(": ", 1)[1]
    assert 'route="GET /v1/users/me"' in message  # quoted: one value, not two words
    # JSON lines keep every field for machines
    payload = json.loads(JsonFormatter().format(_record(caplog, rpc_over_http, 200)))
    assert {"method", "code", "duration_ms", "route", "http_status", "request_id"} <= payload.keys()
    assert "_in_message" not in payload
