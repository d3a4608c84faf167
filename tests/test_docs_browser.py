"""/docs in a real headless browser (Debian's chromium driven by Playwright, which never
downloads a browser here): the page loads offline, lists every operation of the OpenAPI
document, and a call made from the page succeeds. Without chromium the test is skipped on a
laptop and fails in CI (REFERRAL_TEST_REQUIRE_BACKENDS=1)."""

from __future__ import annotations

import os
import shutil

import pytest

from referral_service.gateway import descriptors
from tests.conftest import REQUIRE, Api

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str | None:
    configured = os.environ.get("REFERRAL_TEST_CHROMIUM")
    if configured:
        return configured
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.one_stack
async def test_docs_page_in_a_headless_browser(api: Api) -> None:
    executable = _chromium()
    try:
        from playwright.async_api import async_playwright
    except ImportError:  # pragma: no cover - a dev dependency
        async_playwright = None  # type: ignore[assignment]
    if executable is None or async_playwright is None:
        reason = (
            "chromium is not installed (apt-get install chromium)" if executable is None else "no playwright"
        )
        if REQUIRE:
            pytest.fail(f"the browser test is required in CI: {reason}")
        pytest.skip(reason)

    email = api.unique_email("docs")
    _, token = await api.user_with_token(email)
    from referral.v1 import referral_pb2

    from tests.conftest import bearer

    await api.referral.CreateReferralCode(
        referral_pb2.CreateReferralCodeRequest(ttl={"seconds": 3600}), metadata=bearer(token)
    )
    base = f"http://127.0.0.1:{api.app.http_port}"
    async with async_playwright() as playwright:
        # Playwright gives every launch a fresh, temporary --user-data-dir of its own.
        browser = await playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            page = await browser.new_page()
            offsite: list[str] = []
            page.on(
                "request",
                lambda request: offsite.append(request.url) if not request.url.startswith(base) else None,
            )
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            response = await page.goto(f"{base}/docs")
            assert response is not None
            assert response.status == 200
            await page.wait_for_selector(".opblock", timeout=30_000)
            operations = await page.locator(".opblock").count()
            assert operations == len(descriptors.bindings())
            summaries = await page.locator(".opblock-summary-path").all_inner_texts()
            assert any(
                "/v1/referral-codes/by-email/{email}" in text.replace("\u200b", "") for text in summaries
            )

            # Try GetReferralCodeByEmail from the page.
            block = page.locator("#operations-ReferralService-ReferralService_GetReferralCodeByEmail")
            await block.locator(".opblock-summary").click()
            try_out = block.locator("button.try-out__btn")
            if await try_out.count() and "try it out" in (await try_out.inner_text()).lower():
                await try_out.click()  # tryItOutEnabled makes this unnecessary; be robust anyway
            await block.locator("input[placeholder='email']").fill(email)
            await block.locator("button.execute").click()
            status = block.locator(".live-responses-table .response .response-col_status").first
            await status.wait_for(timeout=30_000)
            assert (await status.inner_text()).strip().startswith("200")
            body = await block.locator(".live-responses-table .microlight").first.inner_text()
            assert '"referralCode"' in body
            assert not offsite, f"the docs page fetched from elsewhere: {offsite}"
            assert not errors, errors
        finally:
            await browser.close()


@pytest.mark.one_stack
async def test_verification_and_reset_links_in_a_headless_browser(api: Api) -> None:
    """The links of the messages, opened as a user would: the verification page confirms and
    says so; the reset page takes a new password; a used link says it was used."""
    executable = _chromium()
    try:
        from playwright.async_api import async_playwright
    except ImportError:  # pragma: no cover - a dev dependency
        async_playwright = None  # type: ignore[assignment]
    if executable is None or async_playwright is None:
        if REQUIRE:
            pytest.fail("the browser test is required in CI: chromium or playwright missing")
        pytest.skip("no chromium or playwright")
    from referral.v1 import auth_pb2

    from tests.mail import link_of, wait_for

    email = api.unique_email("browser")
    await api.register(email)
    (message,) = await wait_for(api.mailbox, email, "verify_email")
    base = f"http://127.0.0.1:{api.app.http_port}"
    # The development default points the links at this server (REFERRAL_PUBLIC_URL).
    link = link_of(message).replace("http://127.0.0.1:8080", base)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            response = await page.goto(link)
            assert response is not None
            assert response.status == 200
            assert response.headers["referrer-policy"] == "no-referrer"
            await page.wait_for_selector("#status.ok")
            assert "Email address confirmed" in await page.inner_text("#title")
            assert email in await page.inner_text("#status")
            assert "token" not in page.url  # dropped from the address bar
            # The same link again (a new tab, as from the message): used.
            page = await browser.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            await page.goto(link)
            await page.wait_for_selector("#status.error")
            assert "used already" in await page.inner_text("#status")

            await api.auth.RequestPasswordReset(auth_pb2.RequestPasswordResetRequest(email=email))
            (reset,) = await wait_for(api.mailbox, email, "password_reset")
            page = await browser.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            await page.goto(link_of(reset).replace("http://127.0.0.1:8080", base))
            await page.fill("#password", "browser chosen passphrase 9")
            await page.fill("#confirm", "browser chosen passphrase 9")
            await page.click("button[type=submit]")
            await page.wait_for_selector("#status.ok")
            assert "Password changed" in await page.inner_text("#title")
            assert errors == []
        finally:
            await browser.close()
    await api.login(email, "browser chosen passphrase 9")
