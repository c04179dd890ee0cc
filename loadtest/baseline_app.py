"""The baseline the service is measured against: the FastAPI + ONNX Runtime server tutorials ship.

One shared ORT session, a full Pillow decode (no draft), no batching, and an `async def` endpoint
that runs decode and inference on the event loop: the pattern most tutorials show. It serialises
requests (measured on this machine kind: flat throughput, latency grows with the queue), which is
exactly why it is the bar to beat, not a strawman: it is what people deploy.

    MODEL_DIR=~/bentoml/models/mobilenetv2-bench/v1 uvicorn loadtest.baseline_app:app --port 8000

Preprocessing is the project's own `preprocess` (the same pixels as the service); only the
serving design differs.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, File, UploadFile
from PIL import Image

from image_classifier.core.classifier import read_card
from image_classifier.core.postprocessing import softmax
from image_classifier.core.preprocessing import preprocess

MODEL_DIR = Path(os.environ.get("MODEL_DIR", "."))
CARD = read_card(MODEL_DIR)
SESSION = ort.InferenceSession(str(MODEL_DIR / CARD.onnx_file), providers=["CPUExecutionProvider"])
app = FastAPI()


@app.get("/readyz")
def ready() -> dict:
    return {"ready": True}


@app.post("/analyze")
async def analyze(image: UploadFile = File(...)) -> dict:  # noqa: B008 - FastAPI's idiom
    picture = Image.open(io.BytesIO(await image.read()))
    picture.load()  # full decode: no draft
    tensor = preprocess(picture, CARD.preprocessing)[None]
    (logits,) = SESSION.run([CARD.output_name], {CARD.input_name: tensor})
    probabilities = softmax(np.asarray(logits))[0] if CARD.output_kind == "logits" else logits[0]
    best = int(np.argmax(probabilities))
    return {"label": CARD.labels[best], "confidence": float(probabilities[best])}
