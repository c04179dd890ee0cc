"""Image classification core: decode, validate, preprocess, run (ONNX Runtime), postprocess.

Plain Python: no BentoML here, so it is tested, reused by training and served by `service.py`.
"""

__version__ = "0.1.0"
