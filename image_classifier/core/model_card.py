"""The model card: everything needed to serve a model correctly, stored with it in its metadata.

The service trusts nothing but the card: labels, preprocessing and the meaning of the output all
come from here, so any ONNX classifier with a correct card is served without code changes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .preprocessing import PreprocessSpec


class HeldOutMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")

    accuracy: float | None = Field(None, ge=0, le=1)
    mean_top1_confidence: float | None = Field(
        None, ge=0, le=1, description="baseline for the drift alarm"
    )
    samples: int | None = Field(None, ge=0)

    @property
    def int8_gate(self) -> dict | None:
        """The figures of the gate an INT8 entry passed (`quantize` writes them); None for any
        other model."""
        figures = (self.model_extra or {}).get("int8_gate")
        return figures if isinstance(figures, dict) else None


class ModelCard(BaseModel):
    """Serialised as plain JSON into the BentoML model's metadata (key `card`)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str
    task: Literal["image-classification"] = "image-classification"
    labels: list[str] = Field(min_length=2)
    preprocessing: PreprocessSpec
    output_kind: Literal["logits", "probabilities"] = Field(
        description="logits get a softmax in the service; probabilities are used as they are"
    )
    onnx_file: str = "model.onnx"
    input_name: str
    output_name: str
    opset: int | None = None
    metrics: HeldOutMetrics = HeldOutMetrics()
    training_data_sha256: str | None = None
    source: Literal["trained", "imported", "exported"] = Field(
        "trained", description="trained here, imported as ONNX, or exported from your PyTorch"
    )
    benchmark_only: bool = Field(False, description="random weights: for timing, never for answers")
    description: str = ""
    versions: dict[str, str] = Field(default_factory=dict, description="libraries used to make it")
    git_commit: str | None = None

    @model_validator(mode="after")
    def _labels_unique(self) -> ModelCard:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        return self
