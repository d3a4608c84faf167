"""Domain values -> protos."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import timestamp_pb2
from referral.v1 import auth_pb2, referral_pb2

from referral_service.domain import models
from referral_service.domain.clock import utcnow


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    result = timestamp_pb2.Timestamp()
    result.FromDatetime(value)
    return result


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
    return message


_STATES = {
    models.CodeState.ACTIVE: referral_pb2.ReferralCode.STATE_ACTIVE,
    models.CodeState.EXPIRED: referral_pb2.ReferralCode.STATE_EXPIRED,
    models.CodeState.REVOKED: referral_pb2.ReferralCode.STATE_REVOKED,
    models.CodeState.EXHAUSTED: referral_pb2.ReferralCode.STATE_EXHAUSTED,
}


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


def referral(value: models.Referral) -> referral_pb2.Referral:
    return referral_pb2.Referral(
        user_id=value.user_id,
        email=value.email,
        join_time=timestamp(value.join_time),
        code=value.code,
    )
