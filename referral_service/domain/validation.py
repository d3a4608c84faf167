"""Input rules shared by the use cases: email syntax and normalisation, password policy,
referral-code syntax, request ids.

Email policy (docs/clients.md, "Rules worth knowing"): surrounding white space is removed, the domain is
lower-cased (and IDNA-normalised) by ``email-validator``, and the local part keeps its case for
display. Uniqueness and look-ups use the whole address lower-cased (``email_key``), because
every mainstream mail provider treats the local part case-insensitively and the predecessor's
case-sensitive uniqueness let ``Alice@x.com`` lock out ``alice@x.com``. Accounts are the
address as typed (``a.b+x@gmail.com`` and ``ab@gmail.com`` are two accounts, each logging in
with its own address); only the self-referral rule compares mailboxes (``canonical_mailbox``).

Password policy after OWASP ASVS 5 / NIST SP 800-63B: NFKC-normalised, 8 to 128 characters,
any Unicode, no composition rules, never truncated, the 30,000 most common passwords (the
list shipped by ``zxcvbn``, see ``data/common-passwords.txt``) and the user's own email refused.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib.resources import files

from email_validator import EmailNotValidError, validate_email

from referral_service.domain.errors import FieldViolation

EMAIL_MAX = 254
LOCAL_PART_MAX = 64  # RFC 5321 section 4.5.3.1.1
PASSWORD_MIN = 8
PASSWORD_MAX = 128
CODE_MIN = 4
CODE_MAX = 32
_CODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True, slots=True)
class Email:
    """A valid address: ``display`` is what we store and show, ``key`` what we compare."""

    display: str
    key: str


@lru_cache(maxsize=16384)
def parse_email(raw: str, field: str = "email") -> Email | FieldViolation:
    """Validate and normalise an address (pure, so results are memoised: the hot look-up path
    would otherwise spend more time here than in the rest of the call)."""
    value = raw.strip()
    if not value:
        return FieldViolation(field, "is required", "REQUIRED")
    if len(value) > EMAIL_MAX:
        return FieldViolation(field, f"must be at most {EMAIL_MAX} characters", "TOO_LONG")
    try:
        result = validate_email(value, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError as exc:
        return FieldViolation(field, f"is not a valid email address: {exc}", "INVALID_EMAIL")
    normalized = result.normalized
    if len(result.local_part.encode()) > LOCAL_PART_MAX:
        return FieldViolation(
            field, f"the part before the @ must be at most {LOCAL_PART_MAX} bytes", "INVALID_EMAIL"
        )
    return Email(display=normalized, key=normalized.lower())


class DisposableDomains:
    """Known disposable-email domains (the ``disposable-email-domains`` package, maintained
    upstream and updated with each release), plus ``extra``, minus ``allowed``. Subdomains of a
    listed domain are disposable too."""

    def __init__(self, extra: Iterable[str] = (), allowed: Iterable[str] = ()) -> None:
        from disposable_email_domains import allowlist, blocklist

        self._allowed = {d.strip().lower() for d in allowed} | {d.lower() for d in allowlist}
        self._blocked = ({d.lower() for d in blocklist} | {d.strip().lower() for d in extra}) - self._allowed

    def __contains__(self, domain: str) -> bool:
        labels = domain.lower().rstrip(".").split(".")
        for start in range(len(labels) - 1):
            candidate = ".".join(labels[start:])
            if candidate in self._allowed:
                return False
            if candidate in self._blocked:
                return True
        return False


def disposable_violation(
    email: Email, domains: DisposableDomains, field: str = "email"
) -> FieldViolation | None:
    domain = email.key.rpartition("@")[2]
    if domain in domains:
        return FieldViolation(
            field, "uses a disposable email domain; use a permanent address", "DISPOSABLE_DOMAIN"
        )
    return None


#: Domains whose mail service ignores dots in the local part, and the domain they are an alias
#: of. Only Google documents both for its consumer mail (not for Workspace domains): the other big
#: providers keep dots significant (Outlook, Yahoo, iCloud, Fastmail) or say nothing firm, and
#: Yahoo's ``-keyword`` "disposable addresses" hang off a base name that is not the account's
#: own, so dropping ``-keyword`` would not lead back to the owner. Neither is applied.
_DOTLESS_DOMAINS = {"gmail.com": "gmail.com", "googlemail.com": "gmail.com"}


@lru_cache(maxsize=4096)
def canonical_mailbox(address: str) -> str:
    """The mailbox an address delivers to, for rules that must see through aliases (the
    self-referral rule), never for accounts or log-in. ``address`` is a valid, normalised
    address (``Email.display`` or ``Email.key``).

    - lower-cased (as ``email_key``);
    - a ``+tag`` sub-address is dropped at every domain: ``bob+news@x.com`` -> ``bob@x.com``
      (RFC 5233 sub-addressing, which the big providers and most mail servers deliver to the
      base mailbox; at a domain that does not, the two may be different mailboxes, and the
      rule errs on the side of calling them one);
    - at gmail.com and googlemail.com, dots in the local part are dropped and the domain is
      gmail.com: ``A.B+x@googlemail.com`` -> ``ab@gmail.com``.
    """
    local, _, domain = address.lower().rpartition("@")
    base, plus, _tag = local.partition("+")
    if plus and base:  # "+tag@x" alone is a mailbox name, not a sub-address
        local = base
    mapped = _DOTLESS_DOMAINS.get(domain)
    if mapped is not None:
        local, domain = local.replace(".", ""), mapped
    return f"{local}@{domain}"


def email_key(raw: str) -> str | None:
    """The comparison key of ``raw``, or None when it is not a valid address."""
    parsed = parse_email(raw)
    return parsed.key if isinstance(parsed, Email) else None


@cache
def _common_passwords() -> frozenset[str]:
    """zxcvbn's list of the 30,000 most common passwords, extracted into a small data file by
    ``make common-passwords`` (importing zxcvbn itself would cost a worker 14 MB of memory)."""
    text = files("referral_service").joinpath("data/common-passwords.txt").read_text(encoding="utf-8")
    return frozenset(line for line in text.splitlines() if line and not line.startswith("#"))


def normalize_password(raw: str) -> str:
    return unicodedata.normalize("NFKC", raw)


def password_violations(password: str, email: Email | None, field: str = "password") -> list[FieldViolation]:
    """Check an already NFKC-normalised password against the policy."""
    if not password:
        return [FieldViolation(field, "is required", "REQUIRED")]
    length = len(password)
    if length < PASSWORD_MIN:
        return [FieldViolation(field, f"must be at least {PASSWORD_MIN} characters", "TOO_SHORT")]
    if length > PASSWORD_MAX:
        return [FieldViolation(field, f"must be at most {PASSWORD_MAX} characters", "TOO_LONG")]
    if any(unicodedata.category(ch) == "Cc" for ch in password):
        return [FieldViolation(field, "must not contain control characters", "INVALID_CHARACTERS")]
    lowered = password.lower()
    if lowered in _common_passwords():
        return [
            FieldViolation(field, "is one of the most common passwords; choose another", "COMMON_PASSWORD")
        ]
    if email is not None and lowered in {email.key, email.key.split("@", 1)[0]}:
        return [FieldViolation(field, "must not be your email address", "CONTEXT_SPECIFIC")]
    return []


def code_violation(code: str, field: str = "code") -> FieldViolation | None:
    if len(code) < CODE_MIN or len(code) > CODE_MAX:
        return FieldViolation(field, f"must be {CODE_MIN} to {CODE_MAX} characters", "INVALID_LENGTH")
    if not _CODE_RE.fullmatch(code):
        return FieldViolation(
            field,
            "may contain only letters A-Z, digits, '-' and '_', and must start with a letter or digit",
            "INVALID_CHARACTERS",
        )
    return None


def code_key(code: str) -> str:
    return code.strip().upper()


def request_id_violation(request_id: str, field: str = "request_id") -> FieldViolation | None:
    """AIP-155: request ids are UUIDs (any version)."""
    if not request_id:
        return None
    try:
        uuid.UUID(request_id)
    except ValueError:
        return FieldViolation(field, "must be a UUID", "INVALID_FORMAT")
    if len(request_id) > 36:
        return FieldViolation(field, "must be a UUID in its canonical 36-character form", "INVALID_FORMAT")
    return None
