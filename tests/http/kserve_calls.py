"""KServe's Python clients calling a server, run by tests/http/test_open_inference_clients.py in a
process of its own (kserve's generated protocol code and tritonclient's register the same
`inference.*` messages, so one process cannot import both).

    python -m tests.http.kserve_calls HTTP_URL GRPC_TARGET MODEL IMAGE_FILE

prints one JSON object: what each client mode answered for the image and for a bad one.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from pathlib import Path

import httpx
import numpy as np
from grpc.aio import AioRpcError
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig


def image_input(image: bytes, binary: bool) -> InferInput:
    tensor = InferInput("image", [1], "BYTES")
    data = image if binary else base64.b64encode(image)  # JSON carries base64 text
    tensor.set_data_from_numpy(np.array([data], dtype=object), binary_data=binary)
    return tensor


def answer(response) -> dict:
    outputs = {output.name: output.as_numpy() for output in response.outputs}
    label = outputs["label"][0]
    return {
        "probabilities": outputs["probabilities"].ravel().tolist(),
        "label": label.decode() if isinstance(label, bytes) else label,
    }


async def calls(url: str, target: str, model: str, image: bytes) -> dict:
    results: dict = {}
    rest = InferenceRESTClient(RESTConfig(protocol="v2"))
    try:
        results["rest_ready"] = await rest.is_model_ready(url, model)
        for mode, binary in (("rest_binary", True), ("rest_json", False)):
            request = InferRequest(model, [image_input(image, binary)])
            results[mode] = answer(await rest.infer(url, request, model_name=model))
        try:
            await rest.infer(url, InferRequest(model, [image_input(b"junk", True)]), model)
        except httpx.HTTPStatusError as error:
            results["rest_error"] = [error.response.status_code, error.response.json()["error"]]
    finally:
        await rest.close()
    grpc_client = InferenceGRPCClient(target, retries=0)
    try:
        results["grpc_ready"] = await grpc_client.is_model_ready(model)
        results["grpc"] = answer(
            await grpc_client.infer(InferRequest(model, [image_input(image, True)]))
        )
        try:
            await grpc_client.infer(InferRequest(model, [image_input(b"junk", True)]))
        except AioRpcError as error:
            results["grpc_error"] = [str(error.code()), error.details()]
    finally:
        await grpc_client.close()
    return results


if __name__ == "__main__":
    url, target, model, image_file = sys.argv[1:5]
    print(json.dumps(asyncio.run(calls(url, target, model, Path(image_file).read_bytes()))))
