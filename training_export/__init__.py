"""Make models servable: train the default digits CNN, export and verify ONNX, import your own.

BentoML is used here only for its model store; torch only for training (never in the service).
"""

from .digits import render_heldout
from .recipe import DIGITS_SPEC

__all__ = ["DIGITS_SPEC", "render_heldout"]
