"""The strongest Python peer found: the same model and decode served by LitServe, as its docs show.

A `LitAPI` with batching (up to 8 images, 5 ms window) in 2 inference worker processes fed by
LitServe's queue; each worker decodes with the project's own `Classifier.prepare` and runs a
1-thread ONNX Runtime session, so only the serving design differs from the service.

    MODEL_DIR=~/bentoml/models/mobilenetv2-bench/v1 python -m loadtest.litserve_app --port 8000
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import litserve as ls
import numpy as np

from image_classifier.core.classifier import Classifier, ClassifierOptions

MODEL_DIR = Path(os.environ.get("MODEL_DIR", "."))


class ClassifyAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.classifier = Classifier(MODEL_DIR, ClassifierOptions(intra_op_threads=1))

    def decode_request(self, request) -> np.ndarray:
        return self.classifier.prepare(request["image"].file.read())

    def batch(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return inputs

    def predict(self, tensors: list[np.ndarray]) -> np.ndarray:
        return self.classifier.run(tensors)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, probabilities: np.ndarray) -> dict:
        best = int(np.argmax(probabilities))
        return {"label": self.classifier.labels[best], "confidence": float(probabilities[best])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    api = ClassifyAPI(max_batch_size=8, batch_timeout=0.005, api_path="/analyze")
    server = ls.LitServer(
        api, accelerator="cpu", workers_per_device=args.workers, healthcheck_path="/readyz"
    )
    server.run(host=args.host, port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
