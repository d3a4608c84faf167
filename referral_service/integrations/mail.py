"""Sending mail: the messages (plain text and HTML from the templates under
``referral_service/templates/mail``), SMTP through aiosmtplib, and a local mail directory
(Maildir) for development, when no SMTP server is configured.

``REFERRAL_SMTP_URL``:
- ``smtp://user:password@host:587`` - STARTTLS when the server offers it (``?starttls=required``
  refuses to send without it, ``?starttls=off`` never upgrades);
- ``smtps://user:password@host:465`` - TLS from the first byte.
User and password are percent-decoded; certificates are verified against the system's CAs
(or ``REFERRAL_SMTP_CA_FILE``).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import mailbox
import os
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from referral_service.domain.ports import MailRejected, OutgoingMail

log = logging.getLogger("referral_service.mail")

SUBJECTS = {
    "verify_email": "Confirm your email address",
    "password_reset": "Reset your password",
    "password_changed": "Your password was changed",
}

_TEMPLATES = Environment(
    loader=PackageLoader("referral_service", "templates/mail"),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    keep_trailing_newline=True,
)


@dataclass(frozen=True, slots=True)
class SmtpTarget:
    host: str
    port: int
    implicit_tls: bool
    #: None: STARTTLS when offered; True: required; False: never.
    start_tls: bool | None
    username: str | None
    password: str | None


def parse_smtp_url(url: str) -> SmtpTarget:
    """Parse ``smtp://`` / ``smtps://`` URLs; ValueError with a clear message otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "smtps"):
        raise ValueError("must start with smtp:// or smtps://")
    if not parts.hostname:
        raise ValueError("names no host")
    try:
        port = parts.port
    except ValueError as error:
        raise ValueError(f"has a bad port ({error})") from None
    query = parse_qs(parts.query)
    unknown = set(query) - {"starttls"}
    if unknown:
        raise ValueError(f"has unknown parameters: {', '.join(sorted(unknown))}")
    mode = (query.get("starttls") or ["auto"])[-1]
    if mode not in ("auto", "required", "off"):
        raise ValueError("starttls must be auto, required or off")
    implicit = parts.scheme == "smtps"
    if implicit and "starttls" in query:
        raise ValueError("starttls does not apply to smtps:// (TLS from the start)")
    return SmtpTarget(
        host=parts.hostname,
        port=port or (465 if implicit else 587),
        implicit_tls=implicit,
        start_tls=None if implicit or mode == "auto" else mode == "required",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


class MessageBuilder:
    """Renders a queued message into a MIME message (text with an HTML alternative)."""

    def __init__(self, sender: str, product: str) -> None:
        self._sender = sender
        _, address = email.utils.parseaddr(sender)
        self._domain = address.rpartition("@")[2] or "localhost"
        self._product = product

    def build(self, mail: OutgoingMail) -> EmailMessage:
        context = {**mail.context, "product": self._product}
        message = EmailMessage()
        message["From"] = self._sender
        message["To"] = mail.to
        message["Subject"] = SUBJECTS[mail.kind]
        message["Date"] = email.utils.formatdate(usegmt=True)
        message["Message-ID"] = f"<{mail.message_id}@{self._domain}>"
        message["Auto-Submitted"] = "auto-generated"
        text = _TEMPLATES.get_template(f"{mail.kind}.txt").render(context)
        # Plain ASCII goes as it is (lines up to 998 characters are 7bit-safe): a link longer
        # than 78 characters stays one line anyone can copy, not quoted-printable soft breaks.
        plain = text.isascii() and max(map(len, text.splitlines()), default=0) <= 998
        message.set_content(text, cte="7bit" if plain else None)
        message.add_alternative(_TEMPLATES.get_template(f"{mail.kind}.html").render(context), subtype="html")
        return message


class SmtpMailer:
    """The ``Mailer`` port over SMTP (one connection per message)."""

    name = "smtp"

    def __init__(
        self, target: SmtpTarget, builder: MessageBuilder, *, timeout: float, ca_file: Path | None = None
    ) -> None:
        self._target = target
        self._builder = builder
        self._timeout = timeout
        self._tls = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)

    async def send(self, mail: OutgoingMail) -> None:
        target = self._target
        message = self._builder.build(mail)
        try:
            await aiosmtplib.send(
                message,
                hostname=target.host,
                port=target.port,
                username=target.username,
                password=target.password,
                use_tls=target.implicit_tls,
                start_tls=target.start_tls,
                tls_context=self._tls,
                timeout=self._timeout,
            )
        except aiosmtplib.SMTPRecipientsRefused as error:
            codes = [refused.code for refused in error.recipients]
            if codes and all(500 <= code < 600 for code in codes):
                raise MailRejected(f"recipient refused ({codes[0]})") from error
            raise
        except aiosmtplib.SMTPAuthenticationError:
            log.error("the SMTP server refused our credentials: check REFERRAL_SMTP_URL")
            raise
        except aiosmtplib.SMTPResponseException as error:
            if 500 <= error.code < 600:
                raise MailRejected(f"refused ({error.code})") from error
            raise

    async def close(self) -> None:
        return None


class MaildirMailer:
    """The ``Mailer`` port writing each message into a local Maildir (``new/``), for
    development: read them with any mail client, or just ``cat``."""

    name = "maildir"

    def __init__(self, directory: Path, builder: MessageBuilder) -> None:
        self.directory = directory
        self._builder = builder

    def _deliver(self, message: EmailMessage) -> None:
        old = os.umask(0o077)
        try:
            mailbox.Maildir(self.directory, create=True).add(message)
        finally:
            os.umask(old)

    async def send(self, mail: OutgoingMail) -> None:
        message = self._builder.build(mail)
        await asyncio.to_thread(self._deliver, message)

    async def close(self) -> None:
        return None
