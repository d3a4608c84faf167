"""referral.v1.ReferralService: protos in, domain calls, protos out. No business rules here.

Both transports call these methods through the request pipeline; ``context`` is the pipeline's
``Call`` (unused: the caller is ``current_principal()``)."""

from __future__ import annotations

from referral.v1 import referral_pb2, referral_pb2_grpc

from referral_service.api import convert
from referral_service.domain.referrals import CreateCodeCommand, ReferralService
from referral_service.pipeline.call import Call
from referral_service.pipeline.context import current_principal


class ReferralServicer(referral_pb2_grpc.ReferralServiceServicer):
    def __init__(self, service: ReferralService) -> None:
        self._service = service

    async def CreateReferralCode(
        self, request: referral_pb2.CreateReferralCodeRequest, context: object
    ) -> referral_pb2.CreateReferralCodeResponse:
        expire_time = ttl = None
        which = request.WhichOneof("expiry")
        if which == "expire_time":
            expire_time = convert.to_datetime(request.expire_time, "expire_time")
        elif which == "ttl":
            ttl = convert.to_timedelta(request.ttl, "ttl")
        code = await self._service.create_code(
            CreateCodeCommand(
                owner_id=current_principal().user_id,
                code=request.code,
                expire_time=expire_time,
                ttl=ttl,
                max_uses=request.max_uses,
                request_id=request.request_id,
            )
        )
        return referral_pb2.CreateReferralCodeResponse(referral_code=convert.referral_code(code))

    async def GetMyReferralCode(
        self, request: referral_pb2.GetMyReferralCodeRequest, context: object
    ) -> referral_pb2.GetMyReferralCodeResponse:
        code = await self._service.my_code(current_principal().user_id)
        return referral_pb2.GetMyReferralCodeResponse(referral_code=convert.referral_code(code))

    async def DeleteReferralCode(
        self, request: referral_pb2.DeleteReferralCodeRequest, context: object
    ) -> referral_pb2.DeleteReferralCodeResponse:
        await self._service.delete_code(current_principal().user_id)
        return referral_pb2.DeleteReferralCodeResponse()

    async def GetReferralCodeByEmail(
        self, request: referral_pb2.GetReferralCodeByEmailRequest, context: object
    ) -> referral_pb2.GetReferralCodeByEmailResponse:
        code = await self._service.code_by_email(request.email)
        if isinstance(context, Call):  # only code, expire_time and state: no zeros over JSON
            context.sparse_response = True
        return referral_pb2.GetReferralCodeByEmailResponse(referral_code=convert.public_referral_code(code))

    async def ListReferrals(
        self, request: referral_pb2.ListReferralsRequest, context: object
    ) -> referral_pb2.ListReferralsResponse:
        caller = current_principal()
        page = await self._service.list_referrals(
            caller.user_id,
            request.referrer_id,
            request.page_size,
            request.page_token,
            caller_scopes=caller.scopes,
        )
        return referral_pb2.ListReferralsResponse(
            referrals=[convert.referral(item) for item in page.referrals],
            next_page_token=page.next_page_token,
            total_size=min(page.total_size, 2**31 - 1),
        )
