"""Exact interventional TreeSHAP for tree ensembles read straight from the ONNX graph."""
