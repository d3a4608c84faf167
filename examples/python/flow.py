#!/usr/bin/env python3
"""referral-service from a Python service, with nothing but the client distribution:

    pip install 'referral-service-client[typing]'     # from this repository: ./clients/python
    python examples/python/flow.py [host:port]          # default $REFERRAL_GRPC_TARGET or 127.0.0.1:50051

Register, a duplicate refused with a typed error, log in, a channel whose calls carry the token,
create a referral code, look it up by email, register a referral with it, list the referrals.
Type-checked with `mypy --strict` in CI, in a virtualenv that holds only the client.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys

from google.protobuf.duration_pb2 import Duration
from referral.v1 import auth_pb2, referral_pb2
from referral_client import connect
from referral_client.errors import EmailAlreadyRegistered, ValidationFailed

PASSWORD = "correct horse battery staple"


async def main(target: str) -> None:
    suffix = secrets.token_hex(4)
    alice, bob = f"alice-{suffix}@example.com", f"bob-{suffix}@example.com"
    async with connect(target) as anonymous:
        registered = await anonymous.auth.Register(auth_pb2.RegisterRequest(email=alice, password=PASSWORD))
        print("registered:", registered.user.email)
        try:
            await anonymous.auth.Register(auth_pb2.RegisterRequest(email=alice.upper(), password=PASSWORD))
            raise SystemExit("a duplicate registration succeeded")
        except EmailAlreadyRegistered as error:
            print("duplicate refused:", error.reason, error.code().name, "request", error.request_id)
        try:
            await anonymous.auth.Register(auth_pb2.RegisterRequest(email="not-an-email", password="x"))
            raise SystemExit("an invalid registration succeeded")
        except ValidationFailed as error:
            print("invalid fields:", sorted(error.fields))
        tokens = await anonymous.auth.Login(auth_pb2.LoginRequest(email=alice, password=PASSWORD))

        # Calls on this channel carry the access token (call credentials).
        async with connect(target, token=tokens.access_token) as alices:
            me = (await alices.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest())).user
            created = await alices.referrals.CreateReferralCode(
                referral_pb2.CreateReferralCodeRequest(ttl=Duration(seconds=7 * 24 * 3600), max_uses=100)
            )
            print("created code:", created.referral_code.code)
            found = await anonymous.referrals.GetReferralCodeByEmail(
                referral_pb2.GetReferralCodeByEmailRequest(email=alice)
            )
            assert found.referral_code.code == created.referral_code.code
            referred = await anonymous.auth.Register(
                auth_pb2.RegisterRequest(email=bob, password=PASSWORD, referral_code=found.referral_code.code)
            )
            assert referred.user.referrer_id == me.id
            listed = await alices.referrals.ListReferrals(
                referral_pb2.ListReferralsRequest(referrer_id=me.id, page_size=10)
            )
            print("referrals:", [referral.email for referral in listed.referrals])
    print("flow complete")


if __name__ == "__main__":
    default = os.environ.get("REFERRAL_GRPC_TARGET", "127.0.0.1:50051")
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else default))
