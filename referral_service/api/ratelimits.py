"""Which calls are rate limited, by what key, and how the client's address is found.

The interceptor asks ``RateLimits.admit`` before a call runs and ``settle`` after it:

==========================  ===================  ======================================
limit                       key                  counts
==========================  ===================  ======================================
``login-account``           the email (its key)  failed ``Login`` (wrong email/password)
``login-address``           client address       failed ``Login``
``register-address``        client address       every ``Register``
``code-check-address``      client address       ``Register`` naming an unknown code
``lookup-address``          client address       every ``GetReferralCodeByEmail``
==========================  ===================  ======================================

Limits that count failures take one event before the call (so a concurrent burst cannot slip
through) and give it back when the call did not fail in the counted way.

The client address is the TCP peer, unless the peer is in ``trusted_proxies``: then it is the
right-most address of the configured header (``x-forwarded-for``) that is not itself a trusted
proxy. IPv6 addresses are grouped by network (/64 by default), because one host usually owns a
whole /64.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from referral_service.config import Rate, Settings
from referral_service.domain import validation
from referral_service.domain.errors import Reason, ResourceExhausted
from referral_service.domain.ports import RateLimiter

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: From a request message and the client address: the key to count, or None to skip.
KeyOf = Callable[[Any, str], str | None]


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    rate: Rate
    key_of: KeyOf
    #: Only failures with one of these reasons count (empty: every call counts).
    counted_failures: frozenset[Reason] = frozenset()
    #: What the key is, for the error's metadata.
    subject: str = "client_address"


@dataclass(frozen=True, slots=True)
class Grant:
    rule: Rule
    key: str


def _address(_request: Any, address: str) -> str:
    return address


def _account(request: Any, _address: str) -> str | None:
    key = validation.email_key(getattr(request, "email", ""))
    if key is None:
        return None  # no such account can exist; the address limit still counts
    return hashlib.sha256(key.encode()).hexdigest()[:32]  # no emails in Redis keys


def _address_if_code(request: Any, address: str) -> str | None:
    return address if getattr(request, "referral_code", "") else None


def rules_from_settings(settings: Settings) -> dict[str, list[Rule]]:
    if not settings.rate_limits.enabled:
        return {}
    failed_login = frozenset({Reason.INVALID_CREDENTIALS})
    table = {
        "/referral.v1.AuthService/Login": [
            Rule("login-account", settings.rate_limits.login_account, _account, failed_login, "account"),
            Rule("login-address", settings.rate_limits.login_address, _address, failed_login),
        ],
        "/referral.v1.AuthService/Register": [
            Rule("register-address", settings.rate_limits.register_address, _address),
            Rule(
                "code-check-address",
                settings.rate_limits.code_check_address,
                _address_if_code,
                frozenset({Reason.REFERRAL_CODE_UNKNOWN}),
            ),
        ],
        "/referral.v1.ReferralService/GetReferralCodeByEmail": [
            Rule("lookup-address", settings.rate_limits.lookup_address, _address),
        ],
    }
    return {method: [r for r in rules if r.rate.enabled] for method, rules in table.items()}


class ClientAddress:
    def __init__(self, trusted_proxies: Iterable[str], header: str, ipv6_prefix: int) -> None:
        self._trusted: list[IpNetwork] = [ipaddress.ip_network(c, strict=False) for c in trusted_proxies]
        self.header = header.lower()
        self._ipv6_prefix = ipv6_prefix
        # Peers repeat (one per connection): parse each one once.
        self._peer_key = functools.lru_cache(maxsize=4096)(self._peer_key_uncached)

    def _is_trusted(self, address: IpAddress) -> bool:
        return any(address in network for network in self._trusted)

    def resolve(self, peer: str, forwarded: Sequence[str]) -> str:
        """The limit key of the client: an IP (v4) or a network (v6), or the raw peer."""
        if not (self._trusted and forwarded):
            return self._peer_key(peer)
        address = parse_peer(peer)
        if address is None:
            return peer or "unknown"
        return self._through_proxies(address, forwarded)

    def _through_proxies(self, address: IpAddress, forwarded: Sequence[str]) -> str:
        """From a trusted peer, the right-most hop of the header that is not a trusted proxy."""
        if self._trusted and self._is_trusted(address) and forwarded:
            hops = [part.strip() for value in forwarded for part in value.split(",")]
            for hop in reversed(hops):
                try:
                    candidate = ipaddress.ip_address(hop.strip("[]"))
                except ValueError:
                    break  # garbage in the header: stop at the last trustworthy hop
                address = candidate
                if not self._is_trusted(candidate):
                    break
        return self._key(address)

    def _peer_key_uncached(self, peer: str) -> str:
        address = parse_peer(peer)
        return peer or "unknown" if address is None else self._key(address)

    def resolve_ip(self, text: str, forwarded: Sequence[str] = ()) -> str:
        """The limit key of an address given as text (the HTTP gateway's client), with the
        client-address header that HTTP client sent (believed only from a trusted proxy)."""
        try:
            address = ipaddress.ip_address(text.strip().strip("[]"))
        except ValueError:
            return text[:64] or "unknown"
        return self._through_proxies(address, forwarded)

    def _key(self, address: IpAddress) -> str:
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                return str(address.ipv4_mapped)
            return str(ipaddress.IPv6Network((address, self._ipv6_prefix), strict=False))
        return str(address)


def parse_peer(peer: str) -> IpAddress | None:
    """``ipv4:1.2.3.4:5678`` / ``ipv6:[::1]:5678`` -> the address; None for unix sockets etc."""
    kind, _, rest = peer.partition(":")
    try:
        if kind == "ipv4":
            return ipaddress.ip_address(rest.rsplit(":", 1)[0])
        if kind == "ipv6":
            return ipaddress.ip_address(rest.rsplit(":", 1)[0].strip("[]").split("%")[0])
    except ValueError:
        return None
    return None


class RateLimits:
    def __init__(self, limiter: RateLimiter, rules: dict[str, list[Rule]], address: ClientAddress) -> None:
        self._limiter = limiter
        self._rules = rules
        self.address = address

    def applies(self, method: str) -> bool:
        return bool(self._rules.get(method))

    async def admit(self, method: str, request: Any, client: str) -> list[Grant]:
        """Take one event of every limit of this call, or raise RESOURCE_EXHAUSTED (giving back
        what was taken)."""
        grants: list[Grant] = []
        for rule in self._rules.get(method, ()):
            key = rule.key_of(request, client)
            if key is None:
                continue
            full_key = f"{rule.name}:{key}"
            decision = await self._limiter.acquire(full_key, rule.rate.limit, rule.rate.period_seconds)
            if not decision.allowed:
                for grant in grants:
                    await self._give_back(grant)
                wait = retry_seconds(decision.retry_after)
                raise ResourceExhausted(
                    Reason.RATE_LIMITED,
                    f"too many requests ({rule.name}); retry in {wait}s",
                    metadata={
                        "quota_limit": rule.name,
                        "quota_limit_value": str(rule.rate.limit),
                        "quota_period": f"{rule.rate.period_seconds:g}s",
                        "quota_subject": rule.subject,
                        "retry_after_seconds": str(wait),
                    },
                    retry_after_seconds=decision.retry_after,
                )
            grants.append(Grant(rule, full_key))
        return grants

    async def settle(self, grants: Sequence[Grant], failure: Reason | None) -> None:
        """After the call: give back events of failure-counting limits the call did not fail."""
        for grant in grants:
            counted = grant.rule.counted_failures
            if counted and failure not in counted:
                await self._give_back(grant)

    async def _give_back(self, grant: Grant) -> None:
        await self._limiter.release(grant.key, grant.rule.rate.limit, grant.rule.rate.period_seconds)


def retry_seconds(value: float) -> int:
    """Whole seconds for messages and metadata (at least 1)."""
    return max(1, math.ceil(value))
