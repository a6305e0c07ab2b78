"""Inspecting the network: inspectable tensors, activation maps, weight statistics, attention
maps and activation maximisation (pure algorithms over ONNX graphs)."""
