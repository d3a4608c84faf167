"""gRPC layer: proto <-> domain, input shape checks, error mapping, interceptors."""
