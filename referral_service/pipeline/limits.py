"""Rate limits, as each RPC declares them with ``(referral.v1.rate_limit)`` method options.

The declarations are read from the descriptor pool at start-up; the rates (events per period)
come from the composition root by limit name, and a declared limit without a rate stops the
server from starting. Before a call, every limit of the method takes one event for its key
(``admit``); over budget, the call fails with RESOURCE_EXHAUSTED and the events taken are given
back. After the call, a limit that counts only some failures gives its event back unless the
call failed with one of them (``settle``): so a concurrent burst cannot slip through, and only
the counted failures use up the budget.

A limit may count only successful calls instead (``successes_only``). A limit that exempts
trusted clients (``exempt_trusted_clients``) remembers, after each successful call, that the
client address succeeded with that key (in the key-value store, for the trust period); once
the limit is reached, such an address is still let through (its other limits still apply).

Keys: the client's address (``address.py``), the account named by an email field (hashed: no
emails in limiter keys), both together, the client's address only when a field is set, or the
authenticated caller (their user id; the auth stage runs first), optionally only when a field is
set, or the calling service account.

A service account served as a service (a service token with the method's scope) is not an
anonymous client: its own address counts for nothing. Address limits count the end user's
address it forwards in ``end-user-address`` (none forwarded: they do not apply), and limits per
service account (``KEY_KIND_SERVICE_ACCOUNT``) count the service, at the configured rate or the
account's own (``service_rates``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor, ServiceDescriptor
from referral.v1 import errors_pb2, options_pb2

from referral_service import metrics
from referral_service.domain import validation
from referral_service.domain.errors import (
    DomainError,
    FieldViolation,
    InvalidArgument,
    Reason,
    ResourceExhausted,
)
from referral_service.domain.models import Principal
from referral_service.domain.ports import KeyValueCache, RateLimiter
from referral_service.pipeline.address import ClientAddress
from referral_service.pipeline.call import END_USER_ADDRESS, Call, Handler, Stage
from referral_service.pipeline.context import current_principal

#: From a request message and the client address: the key to count, or None to skip.
KeyOf = Callable[[Any, str], str | None]

#: The client when a service calls without forwarding an end user's address: address limits
#: do not apply (their key functions are not called with it).
NO_ADDRESS = ""

RateLimit = options_pb2.RateLimit


class Rate(Protocol):
    """``limit`` events per ``period_seconds`` (``limit == 0``: the limit is off)."""

    @property
    def limit(self) -> int: ...

    @property
    def period_seconds(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    rate: Rate
    key_of: KeyOf
    #: Only failures with one of these reasons count (empty: every call counts).
    counted_failures: frozenset[Reason] = frozenset()
    #: What the key is, for the error's metadata.
    subject: str = "client_address"
    #: Count only successful calls.
    successes_only: bool = False
    #: Over the limit, a client that succeeded with this key before is let through.
    exempt_trusted_clients: bool = False
    #: Counts service accounts (by client id) instead of a key of the request.
    per_service: bool = False


@dataclass(frozen=True, slots=True)
class Grant:
    rule: Rule
    key: str
    rate: Rate


def _by_address(_request: Any, address: str) -> str:
    return address


def _account(request: Any, field: str) -> str | None:
    key = validation.email_key(getattr(request, field))
    if key is None:
        return None  # no such account can exist; the address limit still counts
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _by_account(field: str) -> KeyOf:
    def key_of(request: Any, _address: str) -> str | None:
        return _account(request, field)

    return key_of


def _by_account_and_address(field: str) -> KeyOf:
    def key_of(request: Any, address: str) -> str | None:
        account = _account(request, field)
        return None if account is None else f"{account}:{address}"

    return key_of


def _by_address_if_set(field: str) -> KeyOf:
    def key_of(request: Any, address: str) -> str | None:
        return address if getattr(request, field) else None

    return key_of


def _by_caller(field: str) -> KeyOf:
    def key_of(request: Any, _address: str) -> str | None:
        if field and not getattr(request, field):
            return None
        return str(current_principal().user_id)

    return key_of


def _rule(method: MethodDescriptor, declared: Any, rate: Rate) -> Rule:
    where = f"{method.full_name} (referral.v1.rate_limit) {declared.name!r}"
    kind = declared.key_kind
    key_of: KeyOf
    if kind == RateLimit.KEY_KIND_CALLER:
        if method.GetOptions().Extensions[options_pb2.access] != options_pb2.ACCESS_AUTHENTICATED:
            raise RuntimeError(f"{where}: a caller limit needs an RPC with ACCESS_AUTHENTICATED")
        field = method.input_type.fields_by_name.get(declared.field)
        if declared.field and (
            field is None or field.type != FieldDescriptor.TYPE_STRING or field.is_repeated
        ):
            raise RuntimeError(f"{where}: {declared.field!r} is not a string field of the request")
        key_of, subject = _by_caller(declared.field), "user"
    elif kind == RateLimit.KEY_KIND_CLIENT_ADDRESS:
        if declared.field:
            raise RuntimeError(f"{where}: a client-address limit reads no field")
        key_of, subject = _by_address, "client_address"
    elif kind == RateLimit.KEY_KIND_SERVICE_ACCOUNT:
        if declared.field:
            raise RuntimeError(f"{where}: a service-account limit reads no field")
        key_of, subject = _by_address, "service_account"  # the key is the client id (see admit)
    else:
        field = method.input_type.fields_by_name.get(declared.field)
        if field is None or field.type != FieldDescriptor.TYPE_STRING or field.is_repeated:
            raise RuntimeError(f"{where}: {declared.field!r} is not a string field of the request")
        if kind == RateLimit.KEY_KIND_ACCOUNT_EMAIL:
            key_of, subject = _by_account(declared.field), "account"
        elif kind == RateLimit.KEY_KIND_ACCOUNT_EMAIL_AND_CLIENT_ADDRESS:
            key_of, subject = _by_account_and_address(declared.field), "account_and_client_address"
        elif kind == RateLimit.KEY_KIND_CLIENT_ADDRESS_IF_FIELD_SET:
            key_of, subject = _by_address_if_set(declared.field), "client_address"
        else:
            raise RuntimeError(f"{where}: no key_kind")
    counted = set()
    for number in declared.counted_failures:
        name = errors_pb2.ErrorReason.Name(number).removeprefix("ERROR_REASON_")
        if name == "UNSPECIFIED":
            raise RuntimeError(f"{where}: ERROR_REASON_UNSPECIFIED cannot be counted")
        counted.add(Reason(name))
    if declared.successes_only and counted:
        raise RuntimeError(f"{where}: successes_only cannot be combined with counted_failures")
    return Rule(
        declared.name,
        rate,
        key_of,
        frozenset(counted),
        subject,
        successes_only=declared.successes_only,
        exempt_trusted_clients=declared.exempt_trusted_clients,
        per_service=kind == RateLimit.KEY_KIND_SERVICE_ACCOUNT,
    )


def declared_rules(services: Iterable[ServiceDescriptor], rates: Mapping[str, Rate]) -> dict[str, list[Rule]]:
    """``/package.Service/Method`` -> its limits in declaration order (limits whose rate is off
    left out). Refuses a declared limit without a rate, a rate no RPC declares, and a name
    declared twice."""
    rules: dict[str, list[Rule]] = {}
    declared_names: set[str] = set()
    for service in services:
        for method in service.methods:
            found = []
            for declared in method.GetOptions().Extensions[options_pb2.rate_limit]:
                if declared.name in declared_names:
                    raise RuntimeError(f"rate limit {declared.name!r} is declared twice")
                declared_names.add(declared.name)
                if declared.name not in rates:
                    raise RuntimeError(
                        f"{method.full_name} declares rate limit {declared.name!r}, "
                        "which has no configured rate"
                    )
                rate = rates[declared.name]
                if rate.limit > 0:
                    found.append(_rule(method, declared, rate))
            if found:
                rules[f"/{service.full_name}/{method.name}"] = found
    unused = set(rates) - declared_names
    if unused:
        raise RuntimeError(f"rates configured for limits no RPC declares: {', '.join(sorted(unused))}")
    return rules


def retry_seconds(value: float) -> int:
    """Whole seconds for messages and metadata (at least 1)."""
    return max(1, math.ceil(value))


#: How long a client address that succeeded with a key stays trusted by default.
TRUST_SECONDS = 30 * 24 * 3600.0


class RateLimits:
    def __init__(
        self,
        limiter: RateLimiter,
        rules: Mapping[str, Sequence[Rule]],
        address: ClientAddress,
        trust: KeyValueCache | None = None,
        trust_seconds: float = TRUST_SECONDS,
        service_rates: Mapping[str, Rate] | None = None,
        prefetch: Mapping[str, Callable[[Any], None]] | None = None,
    ) -> None:
        self._limiter = limiter
        #: Per method: starts, from the request, work that can share the round trip of the
        #: limits (the look-up's cache read), before the limits are taken.
        self._prefetch = dict(prefetch or {})
        self._service_rates = dict(service_rates or {})
        self._rules = {method: tuple(found) for method, found in rules.items() if found}
        self.address = address
        self._trust = trust
        self._trust_seconds = trust_seconds
        for found in self._rules.values():
            for rule in found:
                metrics.RATE_LIMITED.labels(limit=rule.name)  # every limit's series, from 0
                if rule.exempt_trusted_clients and trust is None:
                    raise RuntimeError(
                        f"rate limit {rule.name!r} exempts trusted clients: a trust store is needed"
                    )

    @classmethod
    def from_services(
        cls,
        services: Iterable[ServiceDescriptor],
        rates: Mapping[str, Rate],
        limiter: RateLimiter,
        address: ClientAddress,
        trust: KeyValueCache | None = None,
        trust_seconds: float = TRUST_SECONDS,
        service_rates: Mapping[str, Rate] | None = None,
        prefetch: Mapping[str, Callable[[Any], None]] | None = None,
    ) -> RateLimits:
        return cls(
            limiter, declared_rules(services, rates), address, trust, trust_seconds, service_rates, prefetch
        )

    def stage(self, method: str) -> Stage | None:
        """The method's rate-limit stage; None when it has no limits."""
        rules = self._rules.get(method)
        if not rules:
            return None
        resolve = self.address.resolve
        prefetch = self._prefetch.get(method)

        def wrap(inner: Handler) -> Handler:
            async def limited(request: Any, call: Call) -> Any:
                if prefetch is not None:
                    prefetch(request)  # queued now: leaves in the same batch as the limits
                service = call.principal if call.principal is not None and call.principal.is_service else None
                if service is None:
                    client = resolve(call.peer, call.forwarded)
                else:
                    client = self._end_user(call.end_user)
                grants = await self.admit(rules, request, client, service)
                failure: Reason | None = None
                succeeded = False
                try:
                    response = await inner(request, call)
                    succeeded = True
                    return response
                except DomainError as error:
                    failure = error.reason
                    raise
                finally:
                    await self.settle(grants, failure, succeeded=succeeded)
                    if succeeded:
                        await self._remember_trust(rules, request, client)

            return limited

        return wrap

    def _end_user(self, value: str | None) -> str:
        if value is None:
            return NO_ADDRESS
        found = self.address.end_user(value)
        if found is None:
            raise InvalidArgument.fields(
                FieldViolation(END_USER_ADDRESS, "must be an IPv4 or IPv6 address", "INVALID_FORMAT")
            )
        return found

    def _trust_key(self, rule: Rule, key: str, client: str) -> str:
        return f"trust:{rule.name}:{key}:{client}"

    async def _trusted(self, rule: Rule, key: str, client: str) -> bool:
        assert self._trust is not None
        return await self._trust.get(self._trust_key(rule, key, client)) is not None

    async def _remember_trust(self, rules: Sequence[Rule], request: Any, client: str) -> None:
        if client == NO_ADDRESS:
            return
        for rule in rules:
            if rule.exempt_trusted_clients and self._trust is not None:
                key = rule.key_of(request, client)
                if key is not None:
                    await self._trust.set(self._trust_key(rule, key, client), b"1", self._trust_seconds)

    async def admit(
        self, rules: Sequence[Rule], request: Any, client: str, service: Principal | None = None
    ) -> list[Grant]:
        """Take one event of every limit of this call, or raise RESOURCE_EXHAUSTED (giving back
        what was taken). A limit that exempts trusted clients lets a trusted one through
        without taking an event."""
        grants: list[Grant] = []
        for rule in rules:
            rate = rule.rate
            if rule.per_service:
                if service is None:
                    continue
                key: str | None = service.client_id
                rate = self._service_rates.get(service.service_name, rate)
            elif client == NO_ADDRESS:
                continue
            else:
                key = rule.key_of(request, client)
            if key is None or rate.limit <= 0:
                continue
            full_key = f"{rule.name}:{key}"
            decision = await self._limiter.acquire(full_key, rate.limit, rate.period_seconds)
            if not decision.allowed:
                if rule.exempt_trusted_clients and await self._trusted(rule, key, client):
                    continue
                for grant in grants:
                    await self._give_back(grant)
                metrics.RATE_LIMITED.labels(limit=rule.name).inc()
                wait = retry_seconds(decision.retry_after)
                raise ResourceExhausted(
                    Reason.RATE_LIMITED,
                    f"too many requests ({rule.name}); retry in {wait}s",
                    metadata={
                        "quota_limit": rule.name,
                        "quota_limit_value": str(rate.limit),
                        "quota_period": f"{rate.period_seconds:g}s",
                        "quota_subject": rule.subject,
                        "retry_after_seconds": str(wait),
                    },
                    retry_after_seconds=decision.retry_after,
                )
            grants.append(Grant(rule, full_key, rate))
        return grants

    async def settle(
        self, grants: Sequence[Grant], failure: Reason | None, *, succeeded: bool = False
    ) -> None:
        """After the call: give back the events of limits that do not count its outcome
        (failure-counting limits unless it failed with one of their reasons; success-counting
        limits unless it succeeded)."""
        for grant in grants:
            rule = grant.rule
            if rule.successes_only:
                if not succeeded:
                    await self._give_back(grant)
            elif rule.counted_failures and failure not in rule.counted_failures:
                await self._give_back(grant)

    async def _give_back(self, grant: Grant) -> None:
        await self._limiter.release(grant.key, grant.rate.limit, grant.rate.period_seconds)
