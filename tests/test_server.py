"""The server around the services: health, reflection, shutdown, error envelope, request ids,
access rules declared in the proto, message size limit."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from referral.v1 import auth_pb2, errors_pb2, options_pb2, referral_pb2

from referral_service.api.interceptors import ApiInterceptor
from referral_service.app import SERVICES
from referral_service.domain.errors import Reason
from referral_service.pipeline.auth import Authentication, access_rules
from referral_service.pipeline.chain import Pipeline
from tests.conftest import PASSWORD, Api, Stack, bearer, start_api
from tests.errors import expect_error, rich


async def test_health_reports_serving(api: Api) -> None:
    for service in ("", "referral.v1.AuthService", "referral.v1.ReferralService"):
        response = await api.health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    redis = await api.health.Check(health_pb2.HealthCheckRequest(service="referral-service.redis"))
    expected = health_pb2.HealthCheckResponse.SERVING
    assert redis.status == expected  # in-process cache is always up; real Redis is up in tests


async def test_reflection_lists_every_service(api: Api) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(api.channel)

    async def requests() -> Any:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        yield reflection_pb2.ServerReflectionRequest(file_containing_symbol="referral.v1.ReferralService")

    responses = [r async for r in stub.ServerReflectionInfo(requests())]
    names = {s.name for s in responses[0].list_services_response.service}
    assert {
        "referral.v1.AuthService",
        "referral.v1.ReferralService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    assert responses[1].file_descriptor_response.file_descriptor_proto


async def test_graceful_shutdown_finishes_in_flight_calls_and_reports_not_serving(stack: Stack) -> None:
    api = await start_api(stack)
    watch = api.health.Watch(health_pb2.HealthCheckRequest(service=""))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    in_flight = [asyncio.create_task(api.register()) for _ in range(6)]
    await asyncio.sleep(0.005)
    stopping = asyncio.create_task(api.app.stop(grace=5))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    users = await asyncio.gather(*in_flight)
    assert all(user.id for user in users)
    await stopping
    await api.channel.close()


async def test_every_error_has_one_error_info_and_the_request_id(api: Api) -> None:
    call = api.auth.GetCurrentUser(
        auth_pb2.GetCurrentUserRequest(), metadata=(("x-request-id", "trace-123"),)
    )
    error = await expect_error(call, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING")
    assert error.request_id == "trace-123"
    assert error.error_infos == 1


async def test_a_success_echoes_the_request_id(api: Api) -> None:
    call = api.auth.Register(
        auth_pb2.RegisterRequest(email=api.unique_email(), password=PASSWORD),
        metadata=(("x-request-id", "req-42"),),
    )
    await call
    assert ("x-request-id", "req-42") in tuple(await call.trailing_metadata())


async def test_unsafe_request_ids_are_replaced(api: Api) -> None:
    call = api.auth.GetCurrentUser(
        auth_pb2.GetCurrentUserRequest(), metadata=(("x-request-id", "bad id; <script>"),)
    )
    error = await expect_error(call, grpc.StatusCode.UNAUTHENTICATED)
    assert error.request_id != "bad id; <script>"
    assert len(error.request_id) == 32


def test_domain_reasons_match_the_proto_enum() -> None:
    proto = {
        name.removeprefix("ERROR_REASON_")
        for name in errors_pb2.ErrorReason.keys()  # noqa: SIM118 (an EnumTypeWrapper is not iterable)
        if name != "ERROR_REASON_UNSPECIFIED"
    }
    assert proto == {reason.value for reason in Reason}


def test_every_rpc_declares_its_access_level() -> None:
    from referral_service.domain.service_accounts import SCOPES
    from referral_service.pipeline.auth import AUTHENTICATED, PUBLIC, SERVICE, AccessRule

    rules = access_rules(SERVICES, SCOPES)
    assert rules == {
        "/referral.v1.AuthService/Register": AccessRule(PUBLIC, "users:register"),
        "/referral.v1.AuthService/Login": AccessRule(PUBLIC),
        "/referral.v1.AuthService/RefreshToken": AccessRule(PUBLIC),
        "/referral.v1.AuthService/Logout": AccessRule(AUTHENTICATED),
        "/referral.v1.AuthService/ChangePassword": AccessRule(AUTHENTICATED),
        "/referral.v1.AuthService/VerifyEmail": AccessRule(PUBLIC),
        "/referral.v1.AuthService/ResendVerificationEmail": AccessRule(PUBLIC),
        "/referral.v1.AuthService/RequestPasswordReset": AccessRule(PUBLIC),
        "/referral.v1.AuthService/ResetPassword": AccessRule(PUBLIC),
        "/referral.v1.AuthService/ListSessions": AccessRule(AUTHENTICATED),
        "/referral.v1.AuthService/RevokeSession": AccessRule(AUTHENTICATED),
        "/referral.v1.AuthService/RevokeOtherSessions": AccessRule(AUTHENTICATED),
        "/referral.v1.AuthService/RevokeUserSessions": AccessRule(AUTHENTICATED, "sessions:revoke"),
        "/referral.v1.AuthService/GetCurrentUser": AccessRule(AUTHENTICATED),
        "/referral.v1.AuthService/GetJwks": AccessRule(PUBLIC),
        "/referral.v1.AuthService/IssueServiceToken": AccessRule(PUBLIC),
        "/referral.v1.AuthService/GetUser": AccessRule(SERVICE, "users:read"),
        "/referral.v1.AuthService/IntrospectToken": AccessRule(SERVICE, "tokens:introspect"),
        "/referral.v1.ReferralService/CreateReferralCode": AccessRule(AUTHENTICATED),
        "/referral.v1.ReferralService/GetMyReferralCode": AccessRule(AUTHENTICATED),
        "/referral.v1.ReferralService/DeleteReferralCode": AccessRule(AUTHENTICATED),
        "/referral.v1.ReferralService/GetReferralCodeByEmail": AccessRule(PUBLIC),
        "/referral.v1.ReferralService/ListReferrals": AccessRule(AUTHENTICATED, "referrals:read"),
        "/referral.v1.ReferralService/RecordConversion": AccessRule(SERVICE, "conversions:write"),
        "/referral.v1.ReferralService/ReverseConversion": AccessRule(SERVICE, "conversions:write"),
        "/referral.v1.ReferralService/ListRewards": AccessRule(AUTHENTICATED, "rewards:read"),
        "/referral.v1.ReferralService/GetRewardBalance": AccessRule(AUTHENTICATED, "rewards:read"),
        "/referral.v1.ReferralService/ListReferralsForReview": AccessRule(AUTHENTICATED, "referrals:review"),
        "/referral.v1.ReferralService/ReviewReferral": AccessRule(AUTHENTICATED, "referrals:review"),
        "/referral.v1.ReferralService/GetReferralStats": AccessRule(AUTHENTICATED, "rewards:read"),
        "/referral.v1.ReferralService/ListTopReferrers": AccessRule(AUTHENTICATED, "rewards:read"),
        "/referral.v1.EventService/WatchEvents": AccessRule(SERVICE, "events:read"),
        "/referral.v1.EventService/ListEvents": AccessRule(SERVICE, "events:read"),
        **{
            f"/referral.v1.EventService/{name}": AccessRule(AUTHENTICATED, "webhooks:manage")
            for name in (
                "CreateWebhookEndpoint",
                "ListWebhookEndpoints",
                "UpdateWebhookEndpoint",
                "DeleteWebhookEndpoint",
                "RotateWebhookSecret",
                "ListWebhookDeliveries",
                "RetryWebhookDelivery",
            )
        },
    }
    # Every scope the server knows is declared by some RPC.
    declared = {rule.scope for rule in rules.values() if rule.scope}
    assert declared == SCOPES


def test_every_rpc_has_an_http_annotation_and_every_field_a_behavior() -> None:
    from google.api import annotations_pb2, field_behavior_pb2

    for service in SERVICES:
        for method in service.methods:
            rule = method.GetOptions().Extensions[annotations_pb2.http]
            assert rule.WhichOneof("pattern"), method.full_name
            assert method.GetOptions().Extensions[options_pb2.access] != options_pb2.ACCESS_UNSPECIFIED
    for message in (
        auth_pb2.User,
        auth_pb2.RegisterRequest,
        referral_pb2.ReferralCode,
        referral_pb2.Referral,
        auth_pb2.GetJwksResponse,
        auth_pb2.JsonWebKey,
    ):
        for field in message.DESCRIPTOR.fields:
            assert list(field.GetOptions().Extensions[field_behavior_pb2.field_behavior]), field.full_name


async def test_unknown_methods_are_unimplemented(api: Api) -> None:
    call = api.channel.unary_unary("/referral.v1.AuthService/DoesNotExist")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(b"")
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_oversized_requests_are_refused(api: Api) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.auth.Register(auth_pb2.RegisterRequest(email="a@example.com", password="x" * 100_000))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_garbage_payloads_are_invalid_argument_not_internal(api: Api) -> None:
    for method in ("/referral.v1.AuthService/Register", "/referral.v1.ReferralService/ListReferrals"):
        call = api.channel.unary_unary(method)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(b"\xff\xff\xff\xff\x0f")
        details = rich(info.value)
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.reason == "VALIDATION_FAILED"
        assert "Traceback" not in details.message


async def test_unexpected_exceptions_become_internal_without_leaking(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Any bug in a servicer becomes INTERNAL with a request id; the exception is logged, not
    sent."""

    async def broken(request: bytes, context: Any) -> bytes:
        raise RuntimeError("secret database password in a stack trace")

    from referral_service.pipeline.auth import PUBLIC, AccessRule

    rules = {"/test.Broken/Call": AccessRule(PUBLIC)}
    pipeline = Pipeline(Authentication(rules, lambda token: None))  # type: ignore[arg-type,return-value]
    server = grpc.aio.server(interceptors=[ApiInterceptor(pipeline)])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Broken", {"Call": grpc.unary_unary_rpc_method_handler(broken)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with caplog.at_level(logging.ERROR), pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary("/test.Broken/Call")(b"")
        details = rich(info.value)
        assert details.code == grpc.StatusCode.INTERNAL
        assert details.reason == "INTERNAL_ERROR"
        assert "secret" not in details.message
        assert details.request_id in details.message
        assert "secret database password" in caplog.text
    finally:
        await server.stop(0)


async def test_a_token_for_a_deleted_database_user_is_not_found(api: Api) -> None:
    """A token outliving its user (e.g. a restored backup) gets a clear answer."""
    user, token = await api.user_with_token()
    from sqlalchemy import delete

    from referral_service.storage.tables import SessionRow, UserRow

    async with api.app.db.write() as session:
        await session.execute(delete(SessionRow).where(SessionRow.user_id == user.id))
        await session.execute(delete(UserRow).where(UserRow.id == user.id))
    await expect_error(
        api.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(token)),
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
    )


async def test_access_log_has_method_code_duration_and_request_id(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="referral_service.access"):
        await expect_error(
            api.auth.Login(auth_pb2.LoginRequest(email="x@example.com", password="whatever1")),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    records = [r for r in caplog.records if r.name == "referral_service.access"]
    assert records
    record = records[-1]
    assert record.method == "/referral.v1.AuthService/Login"  # type: ignore[attr-defined]
    assert record.code == "UNAUTHENTICATED"  # type: ignore[attr-defined]
    assert record.duration_ms > 0  # type: ignore[attr-defined]
    assert record.request_id  # type: ignore[attr-defined]
    assert "whatever1" not in caplog.text
