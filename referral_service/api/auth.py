"""referral.v1.AuthService: protos in, domain calls, protos out. No business rules here.

Both transports call these methods through the request pipeline; ``context`` is the pipeline's
``Call`` (unused: the caller is ``current_principal()``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from referral.v1 import auth_pb2, auth_pb2_grpc

from referral_service.api import convert
from referral_service.domain.accounts import AccountEmails
from referral_service.domain.auth import AuthService, RegisterCommand
from referral_service.domain.models import ClientInfo, TokenPair
from referral_service.domain.ports import REVOKED_BY_LOGOUT
from referral_service.domain.service_accounts import ServiceAccountService
from referral_service.pipeline.context import current_principal


def _tokens(pair: TokenPair) -> dict[str, object]:
    return {
        "access_token": pair.access_token,
        "token_type": pair.token_type,
        "expires_in": pair.expires_in,
        "refresh_token": pair.refresh_token,
        "refresh_expires_in": pair.refresh_expires_in,
    }


_TOKEN_TYPES = {
    "access_token": auth_pb2.IntrospectTokenResponse.TOKEN_TYPE_ACCESS_TOKEN,
    "refresh_token": auth_pb2.IntrospectTokenResponse.TOKEN_TYPE_REFRESH_TOKEN,
    "service_token": auth_pb2.IntrospectTokenResponse.TOKEN_TYPE_SERVICE_TOKEN,
}


#: The pipeline's call -> where it comes from (address and user agent), for its session.
ClientOf = Callable[[Any], ClientInfo]


def _no_client(call: Any) -> ClientInfo:
    return ClientInfo()


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(
        self,
        service: AuthService,
        service_accounts: ServiceAccountService,
        accounts: AccountEmails,
        client_of: ClientOf = _no_client,
    ) -> None:
        self._service = service
        self._service_accounts = service_accounts
        self._accounts = accounts
        self._client_of = client_of

    async def VerifyEmail(
        self, request: auth_pb2.VerifyEmailRequest, context: object
    ) -> auth_pb2.VerifyEmailResponse:
        user = await self._accounts.verify_email(request.token, request.email, request.code)
        return auth_pb2.VerifyEmailResponse(user=convert.user(user))

    async def ResendVerificationEmail(
        self, request: auth_pb2.ResendVerificationEmailRequest, context: object
    ) -> auth_pb2.ResendVerificationEmailResponse:
        await self._accounts.resend_verification(request.email)
        return auth_pb2.ResendVerificationEmailResponse()

    async def RequestPasswordReset(
        self, request: auth_pb2.RequestPasswordResetRequest, context: object
    ) -> auth_pb2.RequestPasswordResetResponse:
        await self._accounts.request_password_reset(request.email)
        return auth_pb2.RequestPasswordResetResponse()

    async def ResetPassword(
        self, request: auth_pb2.ResetPasswordRequest, context: object
    ) -> auth_pb2.ResetPasswordResponse:
        revoked = await self._accounts.reset_password(request.token, request.new_password)
        return auth_pb2.ResetPasswordResponse(sessions_revoked=revoked)

    async def Register(self, request: auth_pb2.RegisterRequest, context: object) -> auth_pb2.RegisterResponse:
        user = await self._service.register(
            RegisterCommand(
                email=request.email,
                password=request.password,
                referral_code=request.referral_code,
                request_id=request.request_id,
            )
        )
        return auth_pb2.RegisterResponse(user=convert.user(user))

    async def Login(self, request: auth_pb2.LoginRequest, context: object) -> auth_pb2.LoginResponse:
        pair = await self._service.login(request.email, request.password, self._client_of(context))
        return auth_pb2.LoginResponse(**_tokens(pair))  # type: ignore[arg-type]

    async def RefreshToken(
        self, request: auth_pb2.RefreshTokenRequest, context: object
    ) -> auth_pb2.RefreshTokenResponse:
        pair = await self._service.refresh(request.refresh_token, self._client_of(context))
        return auth_pb2.RefreshTokenResponse(**_tokens(pair))  # type: ignore[arg-type]

    async def Logout(self, request: auth_pb2.LogoutRequest, context: object) -> auth_pb2.LogoutResponse:
        await self._service.logout(current_principal(), request.refresh_token)
        return auth_pb2.LogoutResponse()

    async def ChangePassword(
        self, request: auth_pb2.ChangePasswordRequest, context: object
    ) -> auth_pb2.ChangePasswordResponse:
        revoked = await self._service.change_password(
            current_principal(), request.current_password, request.new_password
        )
        return auth_pb2.ChangePasswordResponse(sessions_revoked=revoked)

    async def ListSessions(
        self, request: auth_pb2.ListSessionsRequest, context: object
    ) -> auth_pb2.ListSessionsResponse:
        principal = current_principal()
        sessions, next_token = await self._service.list_sessions(
            principal, request.page_size, request.page_token
        )
        return auth_pb2.ListSessionsResponse(
            sessions=[
                convert.session(session, current=session.id == principal.session_id) for session in sessions
            ],
            next_page_token=next_token,
        )

    async def RevokeSession(
        self, request: auth_pb2.RevokeSessionRequest, context: object
    ) -> auth_pb2.RevokeSessionResponse:
        await self._service.revoke_session(current_principal(), request.session_id)
        return auth_pb2.RevokeSessionResponse()

    async def RevokeOtherSessions(
        self, request: auth_pb2.RevokeOtherSessionsRequest, context: object
    ) -> auth_pb2.RevokeOtherSessionsResponse:
        principal = current_principal()
        ended = await self._service.revoke_user_sessions(
            principal.user_id, keep=principal.session_id, reason=REVOKED_BY_LOGOUT
        )
        return auth_pb2.RevokeOtherSessionsResponse(sessions_revoked=ended)

    async def RevokeUserSessions(
        self, request: auth_pb2.RevokeUserSessionsRequest, context: object
    ) -> auth_pb2.RevokeUserSessionsResponse:
        ended = await self._service.revoke_any_users_sessions(current_principal(), request.user_id)
        return auth_pb2.RevokeUserSessionsResponse(sessions_revoked=ended)

    async def GetCurrentUser(
        self, request: auth_pb2.GetCurrentUserRequest, context: object
    ) -> auth_pb2.GetCurrentUserResponse:
        user = await self._service.current_user(current_principal())
        return auth_pb2.GetCurrentUserResponse(user=convert.user(user))

    async def GetJwks(self, request: auth_pb2.GetJwksRequest, context: object) -> auth_pb2.GetJwksResponse:
        return auth_pb2.GetJwksResponse(keys=[auth_pb2.JsonWebKey(**key) for key in self._service.jwks()])

    async def IssueServiceToken(
        self, request: auth_pb2.IssueServiceTokenRequest, context: object
    ) -> auth_pb2.IssueServiceTokenResponse:
        token = await self._service_accounts.issue_token(
            request.client_id, request.client_secret, request.scopes
        )
        return auth_pb2.IssueServiceTokenResponse(
            access_token=token.access_token,
            token_type=token.token_type,
            expires_in=token.expires_in,
            scope=" ".join(token.scopes),
        )

    async def GetUser(self, request: auth_pb2.GetUserRequest, context: object) -> auth_pb2.GetUserResponse:
        user = await self._service.get_user(request.user_id, request.email)
        return auth_pb2.GetUserResponse(user=convert.user(user))

    async def IntrospectToken(
        self, request: auth_pb2.IntrospectTokenRequest, context: object
    ) -> auth_pb2.IntrospectTokenResponse:
        found = await self._service.introspect(request.token)
        if not found.active:
            return auth_pb2.IntrospectTokenResponse(active=False)
        response = auth_pb2.IntrospectTokenResponse(
            active=True,
            token_type=_TOKEN_TYPES[found.token_type],
            sub=found.client_id or str(found.user_id),
            scope=" ".join(found.scopes),
            client_id=found.client_id,
            user_id=found.user_id,
        )
        if found.expire_time is not None:
            response.expire_time.CopyFrom(convert.timestamp(found.expire_time))
        if found.issue_time is not None:
            response.issue_time.CopyFrom(convert.timestamp(found.issue_time))
        return response
