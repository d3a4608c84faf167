"""Listing referrals: permission before existence, keyset pages with opaque tokens, sizes."""

from __future__ import annotations

import pytest

from referral_service.domain.errors import InvalidArgument, NotFound, PermissionDenied, Reason
from referral_service.domain.models import User
from referral_service.domain.referrals import ReferralService
from tests.domain.conftest import (
    CACHE_TTL,
    DEFAULT_PAGE,
    MAX_HORIZON,
    MAX_PAGE,
    NEGATIVE_CACHE_TTL,
    REQUEST_ID_TTL,
    Domain,
    raises,
)


async def _with_referrals(domain: Domain, count: int) -> tuple[User, list[User]]:
    referrer = await domain.register()
    await domain.code(referrer, code="FRIENDS1")
    referred = [await domain.register(referral_code="FRIENDS1") for _ in range(count)]
    return referrer, referred


async def test_pages_walk_every_referral_once_in_order(domain: Domain) -> None:
    referrer, referred = await _with_referrals(domain, 5)
    await domain.register()  # not a referral
    seen: list[int] = []
    token = ""
    sizes: list[int] = []
    while True:
        page = await domain.referrals.list_referrals(referrer.id, referrer.id, 2, token)
        assert page.total_size == 5
        sizes.append(len(page.referrals))
        seen += [r.user_id for r in page.referrals]
        token = page.next_page_token
        if not token:
            break
    assert sizes == [2, 2, 1]
    assert seen == [user.id for user in referred]


async def test_a_page_carries_what_a_referral_is(domain: Domain) -> None:
    referrer, [user] = await _with_referrals(domain, 1)
    page = await domain.referrals.list_referrals(referrer.id, referrer.id, 0, "")
    [referral] = page.referrals
    assert (referral.user_id, referral.email, referral.join_time, referral.code) == (
        user.id,
        user.email,
        user.create_time,
        "FRIENDS1",
    )
    assert page.next_page_token == ""


async def test_no_next_token_when_the_last_page_is_full(domain: Domain) -> None:
    referrer, _ = await _with_referrals(domain, 4)
    first = await domain.referrals.list_referrals(referrer.id, referrer.id, 2, "")
    second = await domain.referrals.list_referrals(referrer.id, referrer.id, 2, first.next_page_token)
    assert len(second.referrals) == 2
    assert second.next_page_token == ""


async def test_page_sizes_default_and_cap(domain: Domain) -> None:
    referrer, _ = await _with_referrals(domain, MAX_PAGE + 2)
    default = await domain.referrals.list_referrals(referrer.id, referrer.id, 0, "")
    capped = await domain.referrals.list_referrals(referrer.id, referrer.id, 1000, "")
    assert len(default.referrals) == DEFAULT_PAGE
    assert len(capped.referrals) == MAX_PAGE
    assert capped.next_page_token


async def test_an_account_without_referrals(domain: Domain) -> None:
    user = await domain.register()
    page = await domain.referrals.list_referrals(user.id, user.id, 0, "")
    assert (page.referrals, page.next_page_token, page.total_size) == ([], "", 0)


async def test_permission_is_checked_before_existence(domain: Domain) -> None:
    caller = await domain.register()
    other = await domain.register()
    for referrer_id in (other.id, 999_999):
        error = await raises(PermissionDenied, domain.referrals.list_referrals(caller.id, referrer_id, 0, ""))
        assert error.reason is Reason.PERMISSION_DENIED


async def test_a_superuser_lists_anyone_and_learns_who_does_not_exist(domain: Domain) -> None:
    root = await domain.superuser()
    referrer, referred = await _with_referrals(domain, 2)
    page = await domain.referrals.list_referrals(root.id, referrer.id, 0, "")
    assert [r.user_id for r in page.referrals] == [user.id for user in referred]
    missing = await raises(NotFound, domain.referrals.list_referrals(root.id, 999_999, 0, ""))
    assert missing.reason is Reason.USER_NOT_FOUND


@pytest.mark.parametrize(
    ("referrer_id", "page_size", "page_token", "violations"),
    [
        (0, 0, "", {("referrer_id", "INVALID")}),
        (1, -1, "", {("page_size", "NEGATIVE")}),
        (1, 0, "x" * 513, {("page_token", "TOO_LONG")}),
        (
            -1,
            -1,
            "x" * 513,
            {("referrer_id", "INVALID"), ("page_size", "NEGATIVE"), ("page_token", "TOO_LONG")},
        ),
    ],
)
async def test_list_validation(
    domain: Domain, referrer_id: int, page_size: int, page_token: str, violations: set[tuple[str, str]]
) -> None:
    user = await domain.register()
    error = await raises(
        InvalidArgument, domain.referrals.list_referrals(user.id, referrer_id, page_size, page_token)
    )
    assert error.reason is Reason.VALIDATION_FAILED
    assert {(v.field, v.reason) for v in error.violations} == violations


async def test_page_tokens_are_opaque_and_bound_to_their_request(domain: Domain) -> None:
    root = await domain.superuser()
    referrer, _ = await _with_referrals(domain, 3)
    other = await domain.register()
    token = (await domain.referrals.list_referrals(referrer.id, referrer.id, 1, "")).next_page_token
    assert token
    body, _, mac = token.partition(".")
    for bad in ("garbage", token + "x", f"{body}.{mac[::-1]}", "é"):
        error = await raises(
            InvalidArgument, domain.referrals.list_referrals(referrer.id, referrer.id, 1, bad)
        )
        assert error.reason is Reason.INVALID_PAGE_TOKEN
    # A token for one referrer does not page through another.
    mismatch = await raises(InvalidArgument, domain.referrals.list_referrals(root.id, other.id, 1, token))
    assert mismatch.reason is Reason.INVALID_PAGE_TOKEN
    # Tokens are signed with the server's secret: another secret does not accept them.
    stranger = ReferralService(
        domain.store,
        domain.cache,
        page_secret=b"another-secret-" + b"y" * 32,
        max_horizon=MAX_HORIZON,
        cache_ttl=CACHE_TTL,
        negative_cache_ttl=NEGATIVE_CACHE_TTL,
        default_page_size=DEFAULT_PAGE,
        max_page_size=MAX_PAGE,
        request_id_ttl=REQUEST_ID_TTL,
        clock=domain.clock,
    )
    foreign = await raises(InvalidArgument, stranger.list_referrals(referrer.id, referrer.id, 1, token))
    assert foreign.reason is Reason.INVALID_PAGE_TOKEN
