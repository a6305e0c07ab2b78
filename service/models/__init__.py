"""The model repository (Triton layout + explain.yaml) and the onnxruntime sessions."""
