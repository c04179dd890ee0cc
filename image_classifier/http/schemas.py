"""Response bodies of the HTTP API (they also document it in the OpenAPI schema)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, model_serializer

from ..core.errors import ClassifierError
from ..core.model_card import HeldOutMetrics
from ..core.postprocessing import Prediction
from ..core.preprocessing import PreprocessSpec
from ..serving.routing import ModelRef

__all__ = [
    "AnalyzeBatchResponse",
    "AnalyzeResponse",
    "BatchItem",
    "ErrorEnvelope",
    "Info",
    "ItemError",
    "ModelRef",
]


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


class ErrorEnvelope(BaseModel):
    """Every non-2xx answer outside /v2 (`envelope.error_envelope` writes it)."""

    success: Literal[False] = False
    error: ItemError
    request_id: str


class InfoService(BaseModel):
    name: str
    version: str


class InfoCandidate(ModelRef):
    canary_fraction: float
    shadow_fraction: float


class InfoBatching(BaseModel):
    enabled: bool
    merges: bool  # false where merging would not pay for this model (timed at warm-up)
    measured_gain: float  # per-image time of a run of one / of a full run
    min_gain: float
    max_batch_size: int


class InfoSizing(BaseModel):
    workers: int
    threads: int
    model_runs: int
    ort_intra_op_threads: int
    ort_solo_threads: int
    chosen_from: str


class InfoLimits(BaseModel):
    max_upload_bytes: int
    max_batch_images: int
    max_batch_bytes: int
    max_image_pixels: int
    allowed_formats: list[str]
    max_body_memory: int


class InfoAdmission(BaseModel):
    """Who gets in and for how long: what an operator checks first when requests are refused."""

    auth: bool  # API_TOKENS set
    rate_limit: str  # "" when off
    shared_state: bool  # REDIS_URL set
    max_concurrency: int
    max_receiving: int
    max_receiving_per_client: int
    request_timeout_s: float
    body_timeout_s: float
    body_min_bytes_per_s: int
    shutdown_grace_s: float
    grpc_port: int  # 0: no gRPC
    cache_size: int  # 0: off
    cache_ttl_s: float
    default_top_k: int


class InfoGrades(BaseModel):
    high: float
    medium: float


class Info(BaseModel):
    """`GET /info` (`Predictor.info` writes it; the schemathesis tests hold the two together)."""

    service: InfoService
    model: ModelRef
    candidate: InfoCandidate | None
    source: str
    benchmark_only: bool
    labels: list[str]
    preprocessing: PreprocessSpec
    output_kind: str
    metrics: HeldOutMetrics
    training_data_sha256: str | None
    batching: InfoBatching
    sizing: InfoSizing
    limits: InfoLimits
    admission: InfoAdmission
    grades: InfoGrades
