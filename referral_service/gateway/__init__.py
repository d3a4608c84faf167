"""HTTP/JSON gateway: transcodes HTTP/JSON to our gRPC API from the ``google.api.http``
annotations, and serves the OpenAPI document and the Swagger UI page derived from the protos."""

from referral_service.gateway.server import HttpGateway, bind, loopback_target

__all__ = ["HttpGateway", "bind", "loopback_target"]
