"""The gRPC layer: protos to domain types and back, one error mapping, the server process."""
