"""Python clients of the image-classifier service: a typed client and a batch CLI.

Not part of the bento (bentofile.yaml includes only the service): install the project to use them.
"""

from .errors import (
    ClassifierClientError,
    InvalidInput,
    Overloaded,
    RateLimited,
    ServerError,
    TimedOut,
    Unauthorized,
    Unreachable,
)
from .typed import AnalyzeResult, BatchResult, ImageClassifierClient, ServiceInfo

__all__ = [
    "AnalyzeResult",
    "BatchResult",
    "ClassifierClientError",
    "ImageClassifierClient",
    "InvalidInput",
    "Overloaded",
    "RateLimited",
    "ServerError",
    "ServiceInfo",
    "TimedOut",
    "Unauthorized",
    "Unreachable",
]
