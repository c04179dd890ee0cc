"""Response bodies of the HTTP API (they also document it in the OpenAPI schema)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, model_serializer

from ..core.errors import ClassifierError
from ..core.postprocessing import Prediction
from ..serving.routing import ModelRef

__all__ = ["AnalyzeBatchResponse", "AnalyzeResponse", "BatchItem", "ItemError", "ModelRef"]


class AnalyzeResponse(BaseModel):
    success: Literal[True] = True
    request_id: str
    model: ModelRef
    prediction: Prediction
    latency_ms: float
    cached: bool = False  # true: the same bytes were answered before (duplicate-input cache)


class ItemError(BaseModel):
    code: str
    message: str


class BatchItem(BaseModel):
    index: int
    filename: str | None
    success: bool
    prediction: Prediction | None = None
    error: ItemError | None = None

    @classmethod
    def of(
        cls, index: int, filename: str | None, outcome: Prediction | ClassifierError
    ) -> BatchItem:
        if isinstance(outcome, ClassifierError):
            error = ItemError(**outcome.as_dict())
            return cls(index=index, filename=filename, success=False, error=error)
        return cls(index=index, filename=filename, success=True, prediction=outcome)

    @model_serializer(mode="wrap")
    def _only_what_happened(self, handler):  # noqa: ANN001, ANN202 - pydantic hook
        """A result carries its prediction or its error, never a null placeholder for the other."""
        data = handler(self)
        data.pop("error" if self.success else "prediction", None)
        return data


class AnalyzeBatchResponse(BaseModel):
    success: Literal[True] = True
    request_id: str
    model: ModelRef
    results: list[BatchItem]
    latency_ms: float
