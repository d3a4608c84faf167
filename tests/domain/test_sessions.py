"""Login, refresh-token rotation with reuse detection, logout, and token authentication with
revocations (the database record and the fast copy)."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

from referral_service.domain.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Reason,
    Unauthenticated,
)
from referral_service.domain.models import TokenPair
from tests.domain.conftest import ACCESS_TTL, PASSWORD, Domain, MakeDomain, raises


async def test_login_issues_a_session(domain: Domain) -> None:
    user = await domain.register()
    pair = await domain.auth.login(f"  {user.email.upper()} ", PASSWORD)
    assert pair.token_type == "Bearer"
    assert pair.expires_in == int(ACCESS_TTL.total_seconds())
    principal = await domain.auth.authenticate(pair.access_token)
    assert principal.user_id == user.id
    assert principal.expire_time == domain.clock() + ACCESS_TTL
    assert await domain.auth.current_user(principal) == user


async def test_a_wrong_password_and_an_unknown_email_fail_alike(domain: Domain) -> None:
    user = await domain.register()
    wrong = await raises(Unauthenticated, domain.auth.login(user.email, PASSWORD + "!"))
    unknown = await raises(Unauthenticated, domain.auth.login("nobody@example.com", PASSWORD))
    assert wrong.reason is unknown.reason is Reason.INVALID_CREDENTIALS
    assert wrong.message == unknown.message
    # The unknown email was still checked against a hash (the same time as a wrong password).
    assert domain.hasher.verified_unknown == 1


async def test_login_validates_its_input(domain: Domain) -> None:
    error = await raises(InvalidArgument, domain.auth.login(" ", ""))
    assert {(v.field, v.reason) for v in error.violations} == {
        ("email", "REQUIRED"),
        ("password", "REQUIRED"),
    }


async def test_a_disabled_account_cannot_log_in_or_refresh(domain: Domain) -> None:
    user = await domain.register()
    pair = await domain.login(user)
    domain.store.set_active(user.id, False)
    login = await raises(PermissionDenied, domain.auth.login(user.email, PASSWORD))
    assert login.reason is Reason.ACCOUNT_DISABLED
    refresh = await raises(PermissionDenied, domain.auth.refresh(pair.refresh_token))
    assert refresh.reason is Reason.ACCOUNT_DISABLED
    # The refused refresh changed nothing: the token is still unused.
    domain.store.set_active(user.id, True)
    assert isinstance(await domain.auth.refresh(pair.refresh_token), TokenPair)


async def test_login_rehashes_an_outdated_password_hash(domain: Domain) -> None:
    user = await domain.register()
    domain.hasher.scheme = "v3"
    await domain.login(user)
    async with domain.store.read() as uow:
        credentials = await uow.users.credentials(user.email.lower())
    assert credentials is not None
    assert credentials.password_hash.startswith("v3$")
    await domain.login(user)  # the new hash verifies


async def test_refresh_rotates_the_pair(domain: Domain) -> None:
    user = await domain.register()
    first = await domain.login(user)
    second = await domain.auth.refresh(first.refresh_token)
    assert second.refresh_token != first.refresh_token
    assert second.access_token != first.access_token
    principal = await domain.auth.authenticate(second.access_token)
    assert principal.user_id == user.id
    # Same session (the refresh-token family).
    assert principal.session_id == (await domain.auth.authenticate(first.access_token)).session_id
    third = await domain.auth.refresh(second.refresh_token)
    assert (await domain.auth.authenticate(third.access_token)).user_id == user.id


async def test_reusing_a_rotated_refresh_token_revokes_the_session(domain: Domain) -> None:
    user = await domain.register()
    stolen = await domain.login(user)
    rotated = await domain.auth.refresh(stolen.refresh_token)
    other_session = await domain.login(user)
    reuse = await raises(Unauthenticated, domain.auth.refresh(stolen.refresh_token))
    assert reuse.reason is Reason.REFRESH_TOKEN_REUSED
    # The whole family is revoked: its newest refresh token and its access tokens.
    revoked = await raises(Unauthenticated, domain.auth.refresh(rotated.refresh_token))
    assert revoked.reason is Reason.TOKEN_REVOKED
    for token in (stolen.access_token, rotated.access_token):
        error = await raises(Unauthenticated, domain.auth.authenticate(token))
        assert error.reason is Reason.TOKEN_REVOKED
    # Another session of the same user is untouched.
    assert (await domain.auth.authenticate(other_session.access_token)).user_id == user.id
    assert isinstance(await domain.auth.refresh(other_session.refresh_token), TokenPair)


async def test_concurrent_refreshes_rotate_once(domain: Domain) -> None:
    user = await domain.register()
    pair = await domain.login(user)
    results = await asyncio.gather(
        *(domain.auth.refresh(pair.refresh_token) for _ in range(5)), return_exceptions=True
    )
    rotated = [r for r in results if isinstance(r, TokenPair)]
    assert len(rotated) == 1
    assert all(isinstance(r, Unauthenticated) for r in results if not isinstance(r, TokenPair))


async def test_refresh_refuses_what_is_not_a_live_refresh_token(domain: Domain) -> None:
    user = await domain.register()
    pair = await domain.login(user)
    empty = await raises(InvalidArgument, domain.auth.refresh(""))
    assert [v.field for v in empty.violations] == ["refresh_token"]
    access = await raises(Unauthenticated, domain.auth.refresh(pair.access_token))
    assert access.reason is Reason.TOKEN_INVALID
    # Signed by us but never issued to a session (not in the store).
    forged = domain.tokens.issue_refresh(user.id, uuid.uuid4().hex, domain.clock())
    unknown = await raises(Unauthenticated, domain.auth.refresh(forged.token))
    assert unknown.reason is Reason.TOKEN_INVALID
    garbage = await raises(Unauthenticated, domain.auth.refresh("not.a.token"))
    assert garbage.reason is Reason.TOKEN_INVALID


async def test_logout_revokes_the_session_and_its_tokens(domain: Domain) -> None:
    user, pair, principal = await domain.signed_in()
    other = await domain.login(user)
    await domain.auth.logout(principal, pair.refresh_token)
    access = await raises(Unauthenticated, domain.auth.authenticate(pair.access_token))
    assert access.reason is Reason.TOKEN_REVOKED
    refresh = await raises(Unauthenticated, domain.auth.refresh(pair.refresh_token))
    assert refresh.reason is Reason.TOKEN_REVOKED
    assert (await domain.auth.authenticate(other.access_token)).user_id == user.id


async def test_logout_with_another_users_refresh_token_is_refused(domain: Domain) -> None:
    _user, _pair, principal = await domain.signed_in()
    _other, other_pair, _ = await domain.signed_in()
    error = await raises(PermissionDenied, domain.auth.logout(principal, other_pair.refresh_token))
    assert error.reason is Reason.PERMISSION_DENIED
    assert (await domain.auth.authenticate(other_pair.access_token)).user_id == _other.id


async def test_revocations_are_recorded_in_the_store_and_the_fast_copy(domain: Domain) -> None:
    _user, pair, principal = await domain.signed_in()
    await domain.auth.logout(principal, "")
    keys = [f"jti:{principal.token_id}", f"sid:{principal.session_id}"]
    async with domain.store.read() as uow:
        assert await uow.sessions.any_revoked(keys[:1], domain.clock())
        assert await uow.sessions.any_revoked(keys[1:], domain.clock())
    assert set(domain.revocation_cache.revoked) == set(keys)
    # A process that did not revoke it (an empty local copy) asks the store.
    domain.revocation_cache.revoked.clear()
    error = await raises(Unauthenticated, domain.auth.authenticate(pair.access_token))
    assert error.reason is Reason.TOKEN_REVOKED


async def test_a_revocation_outlives_the_access_tokens_it_covers(domain: Domain) -> None:
    _user, _pair, principal = await domain.signed_in()
    await domain.auth.logout(principal, "")
    async with domain.store.read() as uow:
        live = dict(await uow.sessions.live_revocations(domain.clock()))
    assert live[f"jti:{principal.token_id}"] == principal.expire_time
    assert live[f"sid:{principal.session_id}"] >= domain.clock() + ACCESS_TTL


async def test_a_shared_store_that_cannot_tell_falls_back_to_the_database(make_domain: MakeDomain) -> None:
    domain = make_domain(shared_revocations=True)
    _user, pair, principal = await domain.signed_in()
    # Not seeded yet: the store answers and a re-seed is scheduled.
    assert (await domain.auth.authenticate(pair.access_token)).user_id == principal.user_id
    await domain.auth.logout(principal, "")
    domain.revocation_cache.revoked.clear()  # a restarted, empty shared store
    domain.revocation_cache.seeded = False
    error = await raises(Unauthenticated, domain.auth.authenticate(pair.access_token))
    assert error.reason is Reason.TOKEN_REVOKED
    assert await domain.revocations.resync()
    assert domain.revocation_cache.seeded
    assert f"sid:{principal.session_id}" in domain.revocation_cache.revoked


async def test_a_failed_write_to_the_shared_store_leaves_checks_on_the_database(
    make_domain: MakeDomain,
) -> None:
    domain = make_domain(shared_revocations=True)
    await domain.revocations.resync()  # seeded: it answers "not revoked" by itself
    _user, pair, principal = await domain.signed_in()
    domain.revocation_cache.down = True
    await domain.auth.logout(principal, "")
    domain.revocation_cache.down = False  # back, but without the revocation
    error = await raises(Unauthenticated, domain.auth.authenticate(pair.access_token))
    assert error.reason is Reason.TOKEN_REVOKED


async def test_current_user_of_a_token_whose_user_is_gone(domain: Domain) -> None:
    _user, _pair, principal = await domain.signed_in()
    ghost = dataclasses.replace(principal, user_id=principal.user_id + 1000)
    error = await raises(NotFound, domain.auth.current_user(ghost))
    assert error.reason is Reason.USER_NOT_FOUND
