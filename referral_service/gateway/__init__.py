"""HTTP/JSON gateway: the second transport into the request pipeline, transcoding HTTP/JSON from
the ``google.api.http`` annotations, and serving the OpenAPI document and the Swagger UI page
derived from the protos. It imports nothing from the gRPC transport (``api/``)."""

from referral_service.gateway.server import HttpGateway, bind

__all__ = ["HttpGateway", "bind"]
