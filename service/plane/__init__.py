"""The data plane: decides model, inputs, target, background, budget and method; no gRPC."""
