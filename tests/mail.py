"""Reading the messages the service sends: from the development Maildir (the default in tests:
``<data dir>/mail``) or from a real SMTP server on loopback (``aiosmtpd``, in ``Smtpd``)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import mailbox
import re
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

SUBJECTS = {
    "verify_email": "Confirm your email address",
    "password_reset": "Reset your password",
    "password_changed": "Your password was changed",
}


def maildir_messages(directory: Path) -> list[EmailMessage]:
    if not (directory / "new").exists():
        return []
    box = mailbox.Maildir(directory, factory=None, create=False)
    found = []
    for key in box.iterkeys():
        with box.get_file(key) as handle:
            message = email.message_from_binary_file(handle, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        found.append(message)
    return found


def matching(messages: list[EmailMessage], to: str, kind: str) -> list[EmailMessage]:
    return [m for m in messages if m["To"] == to and m["Subject"] == SUBJECTS[kind]]


async def wait_for(
    read: Callable[[], list[EmailMessage]], to: str, kind: str, *, count: int = 1, attempts: int = 600
) -> list[EmailMessage]:
    """The messages of ``kind`` to ``to`` once there are ``count`` of them (polled, bounded)."""
    for _ in range(attempts):
        found = matching(read(), to, kind)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {kind} message for {to} (found {len(matching(read(), to, kind))})")


def text_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    content = part.get_content()
    assert isinstance(content, str)
    return content


def html_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("html",))
    assert part is not None
    content = part.get_content()
    assert isinstance(content, str)
    return content


def link_of(message: EmailMessage) -> str:
    found = re.search(r"https?://\S+token=[A-Za-z0-9_-]+", text_of(message))
    assert found, text_of(message)
    return found.group(0)


def token_of(message: EmailMessage) -> str:
    return link_of(message).rpartition("token=")[2]


def code_of(message: EmailMessage) -> str:
    found = re.search(r"enter this code in the app: (\d{6})", text_of(message))
    assert found, text_of(message)
    return found.group(1)


class _Collect:
    def __init__(self, owner: Smtpd) -> None:
        self._owner = owner

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self._owner.refuse_with:
            return self._owner.refuse_with
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        message = email.message_from_bytes(content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self._owner.received.append(message)
        self._owner.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 Message accepted for delivery"


class Smtpd:
    """A real SMTP server on 127.0.0.1 (aiosmtpd), optionally requiring a login."""

    def __init__(self, port: int = 0, *, auth: tuple[str, str] | None = None) -> None:
        self.received: list[EmailMessage] = []
        self.envelopes: list[tuple[str | None, list[str]]] = []
        self.logins: list[str] = []
        #: An SMTP reply to refuse every recipient with (e.g. "550 no such user").
        self.refuse_with = ""
        self._auth = auth
        self._port = port
        self._controller: Controller | None = None

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> Any:
        from aiosmtpd.smtp import AuthResult, LoginPassword

        if isinstance(data, LoginPassword) and self._auth is not None:
            login, password = data.login.decode(), data.password.decode()
            if (login, password) == self._auth:
                self.logins.append(login)
                return AuthResult(success=True)
        return AuthResult(success=False, handled=False)

    def start(self) -> int:
        kwargs: dict[str, Any] = {}
        if self._auth is not None:
            kwargs.update(authenticator=self._authenticate, auth_require_tls=False, auth_required=True)
        from tests.live import free_port

        if not self._port:
            self._port = free_port()
        self._controller = Controller(_Collect(self), hostname="127.0.0.1", port=self._port, **kwargs)
        self._controller.start()
        return self._port

    @property
    def port(self) -> int:
        return self._port

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def read(self) -> list[EmailMessage]:
        return list(self.received)
