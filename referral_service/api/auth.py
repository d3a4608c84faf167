"""referral.v1.AuthService: protos in, domain calls, protos out. No business rules here.

Both transports call these methods through the request pipeline; ``context`` is the pipeline's
``Call`` (unused: the caller is ``current_principal()``)."""

from __future__ import annotations

from referral.v1 import auth_pb2, auth_pb2_grpc

from referral_service.api import convert
from referral_service.domain.auth import AuthService, RegisterCommand
from referral_service.domain.models import TokenPair
from referral_service.pipeline.context import current_principal


def _tokens(pair: TokenPair) -> dict[str, object]:
    return {
        "access_token": pair.access_token,
        "token_type": pair.token_type,
        "expires_in": pair.expires_in,
        "refresh_token": pair.refresh_token,
        "refresh_expires_in": pair.refresh_expires_in,
    }


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, service: AuthService) -> None:
        self._service = service

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
        pair = await self._service.login(request.email, request.password)
        return auth_pb2.LoginResponse(**_tokens(pair))  # type: ignore[arg-type]

    async def RefreshToken(
        self, request: auth_pb2.RefreshTokenRequest, context: object
    ) -> auth_pb2.RefreshTokenResponse:
        pair = await self._service.refresh(request.refresh_token)
        return auth_pb2.RefreshTokenResponse(**_tokens(pair))  # type: ignore[arg-type]

    async def Logout(self, request: auth_pb2.LogoutRequest, context: object) -> auth_pb2.LogoutResponse:
        await self._service.logout(current_principal(), request.refresh_token)
        return auth_pb2.LogoutResponse()

    async def GetCurrentUser(
        self, request: auth_pb2.GetCurrentUserRequest, context: object
    ) -> auth_pb2.GetCurrentUserResponse:
        user = await self._service.current_user(current_principal())
        return auth_pb2.GetCurrentUserResponse(user=convert.user(user))

    async def GetJwks(self, request: auth_pb2.GetJwksRequest, context: object) -> auth_pb2.GetJwksResponse:
        return auth_pb2.GetJwksResponse(keys=[auth_pb2.JsonWebKey(**key) for key in self._service.jwks()])
