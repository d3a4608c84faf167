"""Sessions that really end (issue 12): the attacks of the security review, played through the
wire. A refresh racing a logout or a reuse detection, a squatted operator address, a logout
with a bad refresh token, and sessions piling up."""

from __future__ import annotations

import asyncio
import io
import sys

import grpc
import pytest
from referral.v1 import auth_pb2

from referral_service import cli
from tests.conftest import PASSWORD, Api, Stack, bearer, start_api, stop_api
from tests.errors import expect_error

RACES = 100
REUSE_RACES = 50


async def refresh_chain(
    api: Api, refresh_token: str, access_tokens: list[str], revoked: asyncio.Event
) -> str:
    """An attacker holding a refresh token: refresh in a loop, keeping every access token
    obtained, until a refresh fails or the session has been revoked (then once more). Returns
    the last refresh token it got."""
    while True:
        after_revocation = revoked.is_set()
        try:
            response = await api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=refresh_token))
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
            return refresh_token
        access_tokens.append(response.access_token)
        refresh_token = response.refresh_token
        if after_revocation:
            return refresh_token  # a refresh that began after the revocation worked: the bug


async def assert_nothing_survives(api: Api, last_refresh: str, access_tokens: list[str]) -> None:
    await expect_error(
        api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=last_refresh)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    for token in access_tokens:
        await expect_error(
            api.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(token)),
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_REVOKED",
        )


async def assert_session_ended(api: Api, tokens: auth_pb2.LoginResponse) -> None:
    """The session's access token and refresh token are both refused as revoked."""
    await expect_error(
        api.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(tokens.access_token)),
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_REVOKED",
    )
    await expect_error(
        api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=tokens.refresh_token)),
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_REVOKED",
    )


async def logout_race(api: Api, email: str) -> None:
    victim = await api.login(email)
    stolen: list[str] = [victim.access_token]
    revoked = asyncio.Event()

    async def logout() -> None:
        await asyncio.sleep(0)  # let the attacker's loop start first
        await api.auth.Logout(auth_pb2.LogoutRequest(), metadata=bearer(victim.access_token))
        revoked.set()

    last, _ = await asyncio.gather(refresh_chain(api, victim.refresh_token, stolen, revoked), logout())
    await assert_nothing_survives(api, last, stolen)


async def reuse_race(api: Api, email: str) -> None:
    victim = await api.login(email)
    rotated = await api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=victim.refresh_token))
    stolen: list[str] = [victim.access_token, rotated.access_token]
    revoked = asyncio.Event()

    async def reuse() -> None:
        await asyncio.sleep(0)
        # The rotated-out token presented again: the session must end, whoever holds it.
        await expect_error(
            api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=victim.refresh_token)),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        revoked.set()

    last, _ = await asyncio.gather(refresh_chain(api, rotated.refresh_token, stolen, revoked), reuse())
    await assert_nothing_survives(api, last, stolen)


@pytest.mark.postgres_stacks
async def test_no_refresh_chain_outlives_a_logout(api: Api) -> None:
    """100 logouts, each racing an attacker who refreshes the same session in a loop: after
    the logout, none of the attacker's refresh or access tokens works."""
    email = api.unique_email()
    await api.register(email)
    for start in range(0, RACES, 10):
        await asyncio.gather(*(logout_race(api, email) for _ in range(start, min(RACES, start + 10))))


@pytest.mark.postgres_stacks
async def test_no_refresh_chain_outlives_reuse_detection(api: Api) -> None:
    email = api.unique_email()
    await api.register(email)
    for start in range(0, REUSE_RACES, 10):
        await asyncio.gather(*(reuse_race(api, email) for _ in range(start, min(REUSE_RACES, start + 10))))


async def test_logout_and_refresh_race_on_every_stack(api: Api) -> None:
    email = api.unique_email()
    await api.register(email)
    await asyncio.gather(
        *(logout_race(api, email) for _ in range(5)), *(reuse_race(api, email) for _ in range(5))
    )


async def test_a_logout_with_a_bad_refresh_token_still_ends_the_callers_session(api: Api) -> None:
    email = api.unique_email()
    await api.register(email)
    for bad, reason in (
        ("not-a-token", "TOKEN_INVALID"),
        ("x" * 5000, None),  # too long: INVALID_ARGUMENT
    ):
        tokens = await api.login(email)
        error = await expect_error(
            api.auth.Logout(auth_pb2.LogoutRequest(refresh_token=bad), metadata=bearer(tokens.access_token)),
            grpc.StatusCode.UNAUTHENTICATED if reason else grpc.StatusCode.INVALID_ARGUMENT,
            reason,
        )
        assert error.message
        # The caller's own session has ended anyway: its access and refresh tokens are dead.
        await assert_session_ended(api, tokens)
    # Another user's refresh token: refused, but the caller is logged out all the same, and the
    # other user's session is untouched.
    mine = await api.login(email)
    other_email = api.unique_email()
    await api.register(other_email)
    theirs = await api.login(other_email)
    await expect_error(
        api.auth.Logout(
            auth_pb2.LogoutRequest(refresh_token=theirs.refresh_token), metadata=bearer(mine.access_token)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await expect_error(
        api.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(mine.access_token)),
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_REVOKED",
    )
    await api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=theirs.refresh_token))


async def test_a_user_has_at_most_max_sessions_the_oldest_end_first(stack: Stack) -> None:
    api = await start_api(stack, max_sessions_per_user=3)
    try:
        email = api.unique_email()
        await api.register(email)
        sessions = [await api.login(email) for _ in range(5)]
        for ended in sessions[:2]:
            await assert_session_ended(api, ended)
        for live in sessions[2:]:
            await api.auth.GetCurrentUser(
                auth_pb2.GetCurrentUserRequest(), metadata=bearer(live.access_token)
            )
            await api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=live.refresh_token))
    finally:
        await stop_api(api)


async def run_cli(monkeypatch: pytest.MonkeyPatch, stack: Stack, password: str, *args: str) -> int:
    monkeypatch.setenv("REFERRAL_DATABASE_URL", stack.database_url)
    monkeypatch.setenv("REFERRAL_DATA_DIR", str(stack.data_dir))
    monkeypatch.setenv("REFERRAL_REDIS_KEY_PREFIX", stack.redis_prefix)
    if stack.redis_url:
        monkeypatch.setenv("REFERRAL_REDIS_URL", stack.redis_url)
    else:
        monkeypatch.delenv("REFERRAL_REDIS_URL", raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO(password + "\n"))
    return await asyncio.to_thread(cli.main, ["create-superuser", "--password-stdin", *args])


@pytest.mark.redis_stacks
async def test_create_superuser_refuses_a_squatted_address(
    api: Api, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Someone registered the operator's address first. Running the command of docs/security.md must not
    hand them a superuser; promoting on purpose takes the account away from them."""
    operator_password = "the operator's own passphrase"
    await api.register("ops@example.com", password=PASSWORD)
    squatter = await api.login("ops@example.com")

    assert await run_cli(monkeypatch, api.stack, operator_password, "--email", "OPS@example.com") == 1
    err = capsys.readouterr().err
    assert "already exists" in err
    assert "--promote-existing" in err
    me = await api.auth.GetCurrentUser(
        auth_pb2.GetCurrentUserRequest(), metadata=bearer(squatter.access_token)
    )
    assert not me.user.is_superuser
    await expect_error(api.login("ops@example.com", operator_password), grpc.StatusCode.UNAUTHENTICATED)

    assert (
        await run_cli(
            monkeypatch, api.stack, operator_password, "--email", "ops@example.com", "--promote-existing"
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "promoted existing user" in out
    assert "sessions were revoked" in out
    # The squatter's session is over, and their password no longer opens the account.
    await assert_session_ended(api, squatter)
    await expect_error(api.login("ops@example.com", PASSWORD), grpc.StatusCode.UNAUTHENTICATED)
    operator = await api.login("ops@example.com", operator_password)
    me = await api.auth.GetCurrentUser(
        auth_pb2.GetCurrentUserRequest(), metadata=bearer(operator.access_token)
    )
    assert me.user.is_superuser


async def test_changing_the_password_ends_every_other_session(api: Api) -> None:
    email = api.unique_email()
    await api.register(email)
    here, elsewhere = await api.login(email), await api.login(email)
    me = bearer(here.access_token)

    def change(current: str, new: str) -> object:
        return api.auth.ChangePassword(
            auth_pb2.ChangePasswordRequest(current_password=current, new_password=new), metadata=me
        )

    await expect_error(
        change("wrong password!", "a brand new passphrase"),
        grpc.StatusCode.UNAUTHENTICATED,
        "INVALID_CREDENTIALS",
    )
    weak = await expect_error(change(PASSWORD, "password"), grpc.StatusCode.INVALID_ARGUMENT)
    assert list(weak.fields) == ["new_password"]
    empty = await expect_error(change("", ""), grpc.StatusCode.INVALID_ARGUMENT)
    assert sorted(empty.fields) == ["current_password", "new_password"]
    # Nothing changed so far: both sessions live, the old password works.
    await api.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(elsewhere.access_token))
    changed = await change(PASSWORD, "a brand new passphrase")
    assert changed.sessions_revoked == 1
    await assert_session_ended(api, elsewhere)
    await api.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=me)  # this one stays
    await api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=here.refresh_token))
    await expect_error(api.login(email), grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
    await api.login(email, "a brand new passphrase")


async def test_wrong_current_passwords_are_limited_per_user(stack: Stack) -> None:
    api = await start_api(stack, rate_limit_password_change_user="3/1h")
    try:
        email = api.unique_email()
        await api.register(email)
        me = bearer((await api.login(email)).access_token)
        request = auth_pb2.ChangePasswordRequest(
            current_password="guess", new_password="a brand new passphrase"
        )
        for _ in range(3):
            await expect_error(api.auth.ChangePassword(request, metadata=me), grpc.StatusCode.UNAUTHENTICATED)
        error = await expect_error(
            api.auth.ChangePassword(request, metadata=me), grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        assert error.metadata["quota_limit"] == "password-change-user"
    finally:
        await stop_api(api)


async def test_a_user_lists_their_sessions_and_ends_them(api: Api) -> None:
    email = api.unique_email()
    await api.register(email)
    first = await api.login(email)
    second = await api.login(email)
    me = bearer(second.access_token)
    listed = await api.auth.ListSessions(auth_pb2.ListSessionsRequest(), metadata=me)
    assert [s.current for s in listed.sessions] == [False, True]
    assert all(s.client_address == "127.0.0.1" and "grpc" in s.user_agent for s in listed.sessions)
    assert listed.next_page_token == ""
    # Using a session moves its last use.
    before = listed.sessions[0].last_use_time.ToDatetime()
    first = await api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=first.refresh_token))
    again = await api.auth.ListSessions(auth_pb2.ListSessionsRequest(), metadata=me)
    assert again.sessions[0].last_use_time.ToDatetime() >= before
    assert again.sessions[0].id == listed.sessions[0].id
    # Pages of one.
    page = await api.auth.ListSessions(auth_pb2.ListSessionsRequest(page_size=1), metadata=me)
    rest = await api.auth.ListSessions(
        auth_pb2.ListSessionsRequest(page_size=1, page_token=page.next_page_token), metadata=me
    )
    assert [s.id for s in (*page.sessions, *rest.sessions)] == [s.id for s in listed.sessions]
    assert rest.next_page_token == ""
    for bad in (
        auth_pb2.ListSessionsRequest(page_token="bm90LWEtc2Vzc2lvbg"),
        auth_pb2.ListSessionsRequest(page_size=-1),
    ):
        await expect_error(api.auth.ListSessions(bad, metadata=me), grpc.StatusCode.INVALID_ARGUMENT)
    # End the other one; it is gone, and ending it again (or someone else's) is NOT_FOUND.
    other_id = listed.sessions[0].id
    await api.auth.RevokeSession(auth_pb2.RevokeSessionRequest(session_id=other_id), metadata=me)
    await assert_session_ended(api, first)
    await expect_error(
        api.auth.RevokeSession(auth_pb2.RevokeSessionRequest(session_id=other_id), metadata=me),
        grpc.StatusCode.NOT_FOUND,
        "SESSION_NOT_FOUND",
    )
    stranger_email = api.unique_email()
    await api.register(stranger_email)
    stranger = await api.login(stranger_email)
    theirs = (
        (await api.auth.ListSessions(auth_pb2.ListSessionsRequest(), metadata=bearer(stranger.access_token)))
        .sessions[0]
        .id
    )
    await expect_error(
        api.auth.RevokeSession(auth_pb2.RevokeSessionRequest(session_id=theirs), metadata=me),
        grpc.StatusCode.NOT_FOUND,
        "SESSION_NOT_FOUND",
    )
    await api.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(stranger.access_token))
    # Sign out everywhere else.
    extra = [await api.login(email) for _ in range(2)]
    ended = await api.auth.RevokeOtherSessions(auth_pb2.RevokeOtherSessionsRequest(), metadata=me)
    assert ended.sessions_revoked == 2
    for tokens in extra:
        await assert_session_ended(api, tokens)
    left = await api.auth.ListSessions(auth_pb2.ListSessionsRequest(), metadata=me)
    assert [(s.id, s.current) for s in left.sessions] == [(listed.sessions[1].id, True)]


async def test_sessions_over_http_record_the_user_agent(api: Api) -> None:
    import httpx

    email = api.unique_email()
    await api.register(email)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.app.http_port}") as http:
        login = await http.post(
            "/v1/auth/login",
            json={"email": email, "password": PASSWORD},
            headers={"User-Agent": "phone-app/1.0"},
        )
        token = login.json()["accessToken"]
        listed = await http.get("/v1/users/me/sessions", headers={"Authorization": f"Bearer {token}"})
    assert listed.status_code == 200, listed.text
    (session,) = listed.json()["sessions"]
    assert (session["userAgent"], session["clientAddress"], session["current"]) == (
        "phone-app/1.0",
        "127.0.0.1",
        True,
    )


async def test_superusers_and_services_end_a_users_sessions(api: Api) -> None:
    email = api.unique_email()
    victim = await api.register(email)
    _, someone = await api.user_with_token()
    admin_email = api.unique_email("admin")
    await api.app.auth.create_superuser(admin_email, PASSWORD)
    admin = await api.login(admin_email)

    def end(metadata: tuple[tuple[str, str], ...]) -> object:
        return api.auth.RevokeUserSessions(
            auth_pb2.RevokeUserSessionsRequest(user_id=victim.id), metadata=metadata
        )

    await expect_error(end(bearer(someone)), grpc.StatusCode.PERMISSION_DENIED)
    sessions = [await api.login(email) for _ in range(2)]
    assert (await end(bearer(admin.access_token))).sessions_revoked == 2
    for tokens in sessions:
        await assert_session_ended(api, tokens)
    account, secret = await api.app.services.service_accounts.create("fraud-job", ["sessions:revoke"])
    token = (
        await api.auth.IssueServiceToken(
            auth_pb2.IssueServiceTokenRequest(client_id=account.client_id, client_secret=secret)
        )
    ).access_token
    again = await api.login(email)
    assert (await end(bearer(token))).sessions_revoked == 1
    await assert_session_ended(api, again)
    await expect_error(
        api.auth.RevokeUserSessions(
            auth_pb2.RevokeUserSessionsRequest(user_id=10**9), metadata=bearer(token)
        ),
        grpc.StatusCode.NOT_FOUND,
    )


@pytest.mark.redis_stacks
async def test_a_session_ended_on_one_replica_is_ended_on_the_other(stack: Stack) -> None:
    one, two = await start_api(stack), await start_api(stack)
    try:
        email = one.unique_email()
        await one.register(email)
        phone, laptop = await one.login(email), await two.login(email)
        listed = await two.auth.ListSessions(
            auth_pb2.ListSessionsRequest(), metadata=bearer(laptop.access_token)
        )
        assert len(listed.sessions) == 2
        phone_id = next(s.id for s in listed.sessions if not s.current)
        await two.auth.RevokeSession(
            auth_pb2.RevokeSessionRequest(session_id=phone_id), metadata=bearer(laptop.access_token)
        )
        await assert_session_ended(one, phone)
    finally:
        await stop_api(one)
        await stop_api(two)


async def test_hostile_ids_are_invalid_never_internal(api: Api) -> None:
    """Strings PostgreSQL cannot store (a NUL byte) or that no session/client can have."""
    _, token = await api.user_with_token()
    for bad in ("a\x00b", "x" * 65, "", "ünïcode"):
        await expect_error(
            api.auth.RevokeSession(auth_pb2.RevokeSessionRequest(session_id=bad), metadata=bearer(token)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    for bad in ("svc_\x00", "svc_" + "0" * 23 + "\x00", "ünïcode"):
        await expect_error(
            api.auth.IssueServiceToken(auth_pb2.IssueServiceTokenRequest(client_id=bad, client_secret="s")),
            grpc.StatusCode.UNAUTHENTICATED,
            "INVALID_CLIENT",
        )
