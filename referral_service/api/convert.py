"""Domain values -> protos, and the well-known types of requests -> domain values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2
from referral.v1 import auth_pb2, referral_pb2

from referral_service.domain import models
from referral_service.domain.clock import utcnow
from referral_service.domain.errors import FieldViolation, InvalidArgument
from referral_service.domain.ports import SessionRecord

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# The valid ranges of google/protobuf/timestamp.proto (0001-01-01T00:00:00Z to
# 9999-12-31T23:59:59.999999999Z) and duration.proto (+-10,000 years; nanos carry the sign of
# seconds). A message outside them is not a valid value of its type: INVALID_ARGUMENT.
_TIMESTAMP_MIN_SECONDS, _TIMESTAMP_MAX_SECONDS = -62_135_596_800, 253_402_300_799
_DURATION_MAX_SECONDS = 315_576_000_000
_NANOS_MAX = 999_999_999


def to_datetime(value: timestamp_pb2.Timestamp, field: str) -> datetime:
    """A request's Timestamp as an aware UTC datetime (nanoseconds truncated to microseconds);
    INVALID_ARGUMENT naming ``field`` when it lies outside the range Timestamp allows."""
    if not (_TIMESTAMP_MIN_SECONDS <= value.seconds <= _TIMESTAMP_MAX_SECONDS) or not (
        0 <= value.nanos <= _NANOS_MAX
    ):
        raise InvalidArgument.fields(
            FieldViolation(
                field, "is not a valid timestamp (years 0001 to 9999, nanos 0 to 999999999)", "INVALID"
            )
        )
    return _EPOCH + timedelta(seconds=value.seconds, microseconds=value.nanos // 1000)


def to_timedelta(value: duration_pb2.Duration, field: str) -> timedelta:
    """A request's Duration as a timedelta (nanoseconds truncated towards zero to microseconds);
    INVALID_ARGUMENT naming ``field`` when it lies outside the range Duration allows. Any valid
    Duration fits a timedelta (whose range is about 2.7 million years); what it may be added to
    is the use case's business (compare before adding)."""
    seconds, nanos = value.seconds, value.nanos
    if (
        abs(seconds) > _DURATION_MAX_SECONDS
        or abs(nanos) > _NANOS_MAX
        or (seconds > 0 > nanos)
        or (seconds < 0 < nanos)
    ):
        raise InvalidArgument.fields(
            FieldViolation(
                field,
                "is not a valid duration (at most 315576000000 seconds either way; nanos carry the sign"
                " of seconds)",
                "INVALID",
            )
        )
    micros = abs(nanos) // 1000
    return timedelta(seconds=seconds, microseconds=-micros if nanos < 0 else micros)


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    """An aware datetime as a Timestamp (integer arithmetic: several times faster than
    ``Timestamp.FromDatetime``, which matters for pages of 100 referrals)."""
    delta = value - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=delta.days * 86400 + delta.seconds, nanos=delta.microseconds * 1000
    )


def user(value: models.User) -> auth_pb2.User:
    message = auth_pb2.User(
        id=value.id,
        email=value.email,
        is_active=value.is_active,
        is_verified=value.is_verified,
        is_superuser=value.is_superuser,
        create_time=timestamp(value.create_time),
    )
    if value.referrer_id is not None:
        message.referrer_id = value.referrer_id
    if value.email_verification is not None:
        deliverability = _VERIFICATIONS.get(
            value.email_verification, auth_pb2.User.EMAIL_VERIFICATION_UNSPECIFIED
        )
        message.email_deliverability = deliverability
        message.email_verification = deliverability  # deprecated twin
    if value.email_verify_time is not None:
        message.deliverability_check_time.CopyFrom(timestamp(value.email_verify_time))
        message.email_verify_time.CopyFrom(timestamp(value.email_verify_time))  # deprecated twin
    if value.verify_time is not None:
        message.verify_time.CopyFrom(timestamp(value.verify_time))
    if value.profile is not None:
        message.profile.CopyFrom(profile(value.profile))
    return message


_VERIFICATIONS = {
    models.EmailStatus.VALID: auth_pb2.User.EMAIL_VERIFICATION_VALID,
    models.EmailStatus.ACCEPT_ALL: auth_pb2.User.EMAIL_VERIFICATION_ACCEPT_ALL,
    models.EmailStatus.WEBMAIL: auth_pb2.User.EMAIL_VERIFICATION_WEBMAIL,
    models.EmailStatus.UNKNOWN: auth_pb2.User.EMAIL_VERIFICATION_UNKNOWN,
    models.EmailStatus.UNAVAILABLE: auth_pb2.User.EMAIL_VERIFICATION_UNAVAILABLE,
}

_PROFILE_STATES = {
    models.ProfileState.PENDING: auth_pb2.UserProfile.STATE_PENDING,
    models.ProfileState.FOUND: auth_pb2.UserProfile.STATE_FOUND,
    models.ProfileState.NOT_FOUND: auth_pb2.UserProfile.STATE_NOT_FOUND,
    models.ProfileState.FAILED: auth_pb2.UserProfile.STATE_FAILED,
}


def profile(value: models.Profile) -> auth_pb2.UserProfile:
    message = auth_pb2.UserProfile(
        state=_PROFILE_STATES[value.state],
        full_name=value.full_name or "",
        company=value.company or "",
        title=value.title or "",
        location=value.location or "",
        avatar_uri=value.avatar_uri or "",
        source=value.source or "",
    )
    if value.fetch_time is not None:
        message.fetch_time.CopyFrom(timestamp(value.fetch_time))
    return message


_STATES = {
    models.CodeState.ACTIVE: referral_pb2.ReferralCode.STATE_ACTIVE,
    models.CodeState.EXPIRED: referral_pb2.ReferralCode.STATE_EXPIRED,
    models.CodeState.REVOKED: referral_pb2.ReferralCode.STATE_REVOKED,
    models.CodeState.EXHAUSTED: referral_pb2.ReferralCode.STATE_EXHAUSTED,
}


def session(value: SessionRecord, *, current: bool) -> auth_pb2.Session:
    message = auth_pb2.Session(
        id=value.id,
        client_address=value.client_address,
        user_agent=value.user_agent,
        current=current,
    )
    message.create_time.CopyFrom(timestamp(value.create_time))
    message.last_use_time.CopyFrom(timestamp(value.refresh_time or value.create_time))
    message.expire_time.CopyFrom(timestamp(value.expire_time))
    return message


def referral_code(value: models.ReferralCode) -> referral_pb2.ReferralCode:
    return referral_pb2.ReferralCode(
        code=value.code,
        owner_id=value.owner_id,
        create_time=timestamp(value.create_time),
        expire_time=timestamp(value.expire_time),
        max_uses=value.max_uses,
        use_count=value.use_count,
        state=_STATES[value.state(utcnow())],
    )


def public_referral_code(value: models.PublicCode) -> referral_pb2.ReferralCode:
    """The public look-up's code: only ``code``, ``expire_time`` and ``state`` are set."""
    return referral_pb2.ReferralCode(
        code=value.code,
        expire_time=timestamp(value.expire_time),
        state=_STATES[value.state(utcnow())],
    )


REFERRAL_STATES = {
    models.ReferralState.PENDING: referral_pb2.REFERRAL_STATE_PENDING,
    models.ReferralState.QUALIFIED: referral_pb2.REFERRAL_STATE_QUALIFIED,
    models.ReferralState.REWARDED: referral_pb2.REFERRAL_STATE_REWARDED,
    models.ReferralState.REJECTED: referral_pb2.REFERRAL_STATE_REJECTED,
}
#: A request's ReferralState -> the domain's (UNSPECIFIED: no filter).
REFERRAL_STATE_FILTERS = {number: state for state, number in REFERRAL_STATES.items()}


def referral(value: models.Referral) -> referral_pb2.Referral:
    message = referral_pb2.Referral(
        user_id=value.user_id,
        email=value.email,
        join_time=timestamp(value.join_time),
        code=value.code,
        state=REFERRAL_STATES[value.state],
        held_for_review=value.review is models.ReviewState.HELD,
    )
    if value.qualify_time is not None:
        message.qualify_time.CopyFrom(timestamp(value.qualify_time))
    if value.reward_time is not None:
        message.reward_time.CopyFrom(timestamp(value.reward_time))
    return message


def referral_status(value: models.ReferralStatus, *, review: bool = False) -> referral_pb2.Referral:
    """A referral's lifecycle (no email or code); with ``review``, its signals and note."""
    message = referral_pb2.Referral(
        user_id=value.referee_id,
        referrer_id=value.referrer_id,
        join_time=timestamp(value.create_time),
        state=REFERRAL_STATES[value.state],
        held_for_review=value.review is models.ReviewState.HELD,
    )
    if review:
        message.fraud_signals.extend(value.signals)
        message.review_note = value.review_note
    if value.qualify_time is not None:
        message.qualify_time.CopyFrom(timestamp(value.qualify_time))
    if value.reward_time is not None:
        message.reward_time.CopyFrom(timestamp(value.reward_time))
    return message


def conversion(value: models.Conversion) -> referral_pb2.Conversion:
    message = referral_pb2.Conversion(
        event_id=value.event_id,
        user_id=value.user_id,
        kind=value.kind,
        occur_time=timestamp(value.occur_time),
        record_time=timestamp(value.create_time),
    )
    if value.value is not None:
        message.value.currency_code = value.value.currency
        message.value.units = value.value.units
        message.value.nanos = value.value.nanos
    if value.reverse_time is not None:
        message.reverse_time.CopyFrom(timestamp(value.reverse_time))
    return message


_ROLES = {
    models.RewardRole.REFERRER: referral_pb2.Reward.ROLE_REFERRER,
    models.RewardRole.REFEREE: referral_pb2.Reward.ROLE_REFEREE,
}
_REWARD_STATES = {
    models.RewardState.HELD: referral_pb2.Reward.STATE_HELD,
    models.RewardState.AVAILABLE: referral_pb2.Reward.STATE_AVAILABLE,
    models.RewardState.CANCELED: referral_pb2.Reward.STATE_CANCELED,
    models.RewardState.CLAWED_BACK: referral_pb2.Reward.STATE_CLAWED_BACK,
}


def reward(value: models.Reward, now: datetime) -> referral_pb2.Reward:
    """A reward with its state at ``now``."""
    message = referral_pb2.Reward(
        id=value.id,
        user_id=value.user_id,
        referee_id=value.referee_id,
        role=_ROLES[value.role],
        amount=value.amount,
        unit=value.unit,
        state=_REWARD_STATES[value.state(now)],
        rule=value.rule,
        create_time=timestamp(value.create_time),
    )
    if value.available_time is not None:
        message.available_time.CopyFrom(timestamp(value.available_time))
    if value.correct_time is not None:
        message.correct_time.CopyFrom(timestamp(value.correct_time))
    return message


def balance(value: models.Balance) -> referral_pb2.RewardBalance:
    return referral_pb2.RewardBalance(
        unit=value.unit,
        available=value.available,
        held=value.held,
        canceled=value.canceled,
        clawed_back=value.clawed_back,
    )
