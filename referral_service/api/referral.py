"""referral.v1.ReferralService: protos in, domain calls, protos out. No business rules here.

Both transports call these methods through the request pipeline; ``context`` is the pipeline's
``Call`` (unused: the caller is ``current_principal()``)."""

from __future__ import annotations

from referral.v1 import referral_pb2, referral_pb2_grpc

from referral_service.api import convert
from referral_service.domain.errors import FieldViolation, InvalidArgument
from referral_service.domain.models import Money
from referral_service.domain.referrals import CreateCodeCommand, ReferralService
from referral_service.domain.rewards import (
    ConversionResult,
    Period,
    RecordConversionCommand,
    RewardService,
)
from referral_service.pipeline.call import Call
from referral_service.pipeline.context import current_principal

_PERIODS = {
    referral_pb2.ListTopReferrersRequest.PERIOD_UNSPECIFIED: Period.CURRENT_MONTH,
    referral_pb2.ListTopReferrersRequest.PERIOD_CURRENT_MONTH: Period.CURRENT_MONTH,
    referral_pb2.ListTopReferrersRequest.PERIOD_PREVIOUS_MONTH: Period.PREVIOUS_MONTH,
    referral_pb2.ListTopReferrersRequest.PERIOD_ALL_TIME: Period.ALL_TIME,
}


class ReferralServicer(referral_pb2_grpc.ReferralServiceServicer):
    def __init__(self, service: ReferralService, rewards: RewardService) -> None:
        self._service = service
        self._rewards = rewards

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
            state=convert.REFERRAL_STATE_FILTERS.get(request.state),
        )
        return referral_pb2.ListReferralsResponse(
            referrals=[convert.referral(item) for item in page.referrals],
            next_page_token=page.next_page_token,
            total_size=min(page.total_size, 2**31 - 1),
        )

    # --- the referral programme (issue 17) ---------------------------------------------------

    async def RecordConversion(
        self, request: referral_pb2.RecordConversionRequest, context: object
    ) -> referral_pb2.RecordConversionResponse:
        value = None
        if request.HasField("value"):
            value = Money(request.value.currency_code, request.value.units, request.value.nanos)
        result = await self._rewards.record_conversion(
            RecordConversionCommand(
                source=current_principal().service_account_id,
                user_id=request.user_id,
                event_id=request.event_id,
                kind=request.kind,
                occur_time=(
                    convert.to_datetime(request.occur_time, "occur_time")
                    if request.HasField("occur_time")
                    else None
                ),
                value=value,
            )
        )
        response = referral_pb2.RecordConversionResponse(
            conversion=convert.conversion(result.conversion), rewards=self._rewards_of(result)
        )
        if result.referral is not None:
            response.referral.CopyFrom(convert.referral_status(result.referral))
        return response

    async def ReverseConversion(
        self, request: referral_pb2.ReverseConversionRequest, context: object
    ) -> referral_pb2.ReverseConversionResponse:
        result = await self._rewards.reverse_conversion(
            current_principal().service_account_id, request.event_id
        )
        return referral_pb2.ReverseConversionResponse(
            conversion=convert.conversion(result.conversion), rewards=self._rewards_of(result)
        )

    def _rewards_of(self, result: ConversionResult) -> list[referral_pb2.Reward]:
        now = self._rewards.clock()
        return [convert.reward(item, now) for item in result.rewards]

    async def ListRewards(
        self, request: referral_pb2.ListRewardsRequest, context: object
    ) -> referral_pb2.ListRewardsResponse:
        caller = current_principal()
        page = await self._rewards.list_rewards(
            caller.user_id,
            request.user_id,
            request.page_size,
            request.page_token,
            caller_scopes=caller.scopes,
        )
        now = self._rewards.clock()
        return referral_pb2.ListRewardsResponse(
            rewards=[convert.reward(item, now) for item in page.rewards], next_page_token=page.next_page_token
        )

    async def GetRewardBalance(
        self, request: referral_pb2.GetRewardBalanceRequest, context: object
    ) -> referral_pb2.GetRewardBalanceResponse:
        caller = current_principal()
        balances = await self._rewards.balance(caller.user_id, request.user_id, caller_scopes=caller.scopes)
        return referral_pb2.GetRewardBalanceResponse(balances=[convert.balance(item) for item in balances])

    async def ListReferralsForReview(
        self, request: referral_pb2.ListReferralsForReviewRequest, context: object
    ) -> referral_pb2.ListReferralsForReviewResponse:
        caller = current_principal()
        held, token = await self._rewards.held_for_review(
            caller.user_id, request.page_size, request.page_token, caller_scopes=caller.scopes
        )
        return referral_pb2.ListReferralsForReviewResponse(
            referrals=[convert.referral_status(item, review=True) for item in held], next_page_token=token
        )

    async def ReviewReferral(
        self, request: referral_pb2.ReviewReferralRequest, context: object
    ) -> referral_pb2.ReviewReferralResponse:
        decision = request.decision
        if decision not in (request.DECISION_APPROVE, request.DECISION_REJECT):
            raise InvalidArgument.fields(FieldViolation("decision", "must be APPROVE or REJECT", "REQUIRED"))
        caller = current_principal()
        status = await self._rewards.review(
            caller.user_id,
            request.user_id,
            decision == request.DECISION_APPROVE,
            request.note,
            caller_scopes=caller.scopes,
        )
        return referral_pb2.ReviewReferralResponse(referral=convert.referral_status(status, review=True))

    async def GetReferralStats(
        self, request: referral_pb2.GetReferralStatsRequest, context: object
    ) -> referral_pb2.GetReferralStatsResponse:
        caller = current_principal()
        stats = await self._rewards.stats(caller.user_id, request.referrer_id, caller_scopes=caller.scopes)
        message = referral_pb2.ReferralStats(
            referrer_id=stats.referrer_id,
            pending=stats.pending,
            qualified=stats.qualified,
            rewarded=stats.rewarded,
            rejected=stats.rejected,
            held_for_review=stats.held_for_review,
        )
        for totals in stats.rewards:
            message.rewards.add(
                unit=totals.unit,
                granted=totals.granted,
                canceled=totals.canceled,
                clawed_back=totals.clawed_back,
            )
        return referral_pb2.GetReferralStatsResponse(stats=message)

    async def ListTopReferrers(
        self, request: referral_pb2.ListTopReferrersRequest, context: object
    ) -> referral_pb2.ListTopReferrersResponse:
        period = _PERIODS.get(request.period)
        if period is None:
            raise InvalidArgument.fields(FieldViolation("period", "is not a known period", "INVALID"))
        board, token = await self._rewards.top_referrers(period, request.page_size, request.page_token)
        response = referral_pb2.ListTopReferrersResponse(next_page_token=token)
        for entry in board:
            response.entries.add(
                rank=entry.rank, referrer_id=entry.referrer_id, rewarded_referrals=entry.rewarded_referrals
            )
        return response
