"""Business rules. Nothing here imports grpc or protobuf."""
