"""Pixels to probabilities: decoding, preprocessing (shared with training), the ONNX Runtime
session, postprocessing, the model card and the error codes.

The ground floor: it imports nothing from `serving` or `http`, no BentoML, no Starlette, no
metrics. Plain options in, plain values out.
"""
