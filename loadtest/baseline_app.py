"""The two FastAPI + ONNX Runtime servers the service is measured against.

`app`, the tutorial: one shared ORT session with default threads, a full Pillow decode, no
batching, and an `async def` endpoint that runs decode and inference on the event loop — the
pattern most tutorials show. It serialises requests (flat throughput, latency grows with the
queue), which is why it is the bar to beat, not a strawman: it is what people deploy.

`expert_app`, what an expert writes in an afternoon: a plain `def` endpoint (FastAPI's thread pool
runs requests in parallel), a 1-thread ORT session that those threads share, and `Image.draft` so
the JPEG decoder scales big photos down while it decodes.

    MODEL_DIR=~/bentoml/models/mobilenetv2-bench/v1 uvicorn loadtest.baseline_app:app --port 8000
    MODEL_DIR=... uvicorn loadtest.baseline_app:expert_app --port 8001

Preprocessing is the project's own `preprocess` (the same pixels as the service); only the
serving design differs.
"""

from __future__ import annotations

import functools
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


@functools.cache  # one session per app, made by its first request
def _session(threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: ONNX Runtime's default, every core
    return ort.InferenceSession(
        str(MODEL_DIR / CARD.onnx_file), options, providers=["CPUExecutionProvider"]
    )


def _answer(session: ort.InferenceSession, picture: Image.Image) -> dict:
    tensor = preprocess(picture, CARD.preprocessing)[None]
    (logits,) = session.run([CARD.output_name], {CARD.input_name: tensor})
    probabilities = softmax(np.asarray(logits))[0] if CARD.output_kind == "logits" else logits[0]
    best = int(np.argmax(probabilities))
    return {"label": CARD.labels[best], "confidence": float(probabilities[best])}


def _ready() -> dict:
    return {"ready": True}


app = FastAPI()
app.get("/readyz")(_ready)


@app.post("/analyze")
async def analyze(image: UploadFile = File(...)) -> dict:  # noqa: B008 - FastAPI's idiom
    picture = Image.open(io.BytesIO(await image.read()))
    picture.load()  # full decode: no draft
    return _answer(_session(0), picture)


expert_app = FastAPI()
expert_app.get("/readyz")(_ready)


@expert_app.post("/analyze")
def expert_analyze(image: UploadFile = File(...)) -> dict:  # noqa: B008 - FastAPI's idiom
    picture = Image.open(image.file)
    picture.draft("RGB", CARD.preprocessing.decode_size_hint)  # JPEG: decode at 1/2, 1/4, 1/8
    return _answer(_session(1), picture)
