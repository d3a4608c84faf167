"""The request pipeline both transports run every RPC through (gRPC in ``api/``, HTTP/JSON in
``gateway/``), one small module per concern, composed once per method by ``chain.py``::

    context + access log -> [deadline] -> error mapping -> [parse] -> [auth] -> [limits] -> servicer

``call.py`` (what a transport hands in), ``context.py`` (request id, contextvars, the one access
line), ``errors.py`` (DomainError -> google.rpc.Status), ``auth.py`` (the ``(referral.v1.access)``
option), ``limits.py`` (the ``(referral.v1.rate_limit)`` options), ``address.py`` (who the client
is, behind trusted proxies), ``deadline.py`` (a transport's own time limit).

Transport-neutral: it imports the domain, protobuf and the google.rpc protos, never grpc, the
gRPC servicers (``api/``) or the gateway.
"""
