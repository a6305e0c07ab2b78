"""Gradient attribution methods over ONNX graphs: a gradient backend (onnx-ad adjoints run in
onnxruntime, finite differences as the fallback) and the methods built on it."""
