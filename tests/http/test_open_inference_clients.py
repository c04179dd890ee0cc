"""Triton's and KServe's own clients against a real server, in the modes their users call it
with: `tritonclient.http` with binary tensors (its default) and with JSON, `tritonclient.grpc`,
and KServe's `InferenceRESTClient` (binary and JSON) and `InferenceGRPCClient`.

Every answer is checked against /analyze's for the same picture; every error path reaches the
client as the right status with the stable code in a readable message.
"""

from __future__ import annotations

import base64
import concurrent.futures
import gzip
import json
import socket
import subprocess
import sys
from collections.abc import Callable

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from image_classifier.core.model_card import ModelCard
from image_classifier.core.preprocessing import preprocess
from image_classifier.http.protos import grpc_predict_v2_pb2 as pb
from image_classifier.http.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from image_classifier.serving.open_inference import join_bytes_elements
from loadtest.servers import REPO, serve
from tests.http.responses import access_lines, metric_value
from tests.pictures import encode
from tests.readme import readme_block

MODEL = "digits-cnn"
TOKENS = ["reader-http", "reader-grpc", *(f"t{n}" for n in range(16))]


@pytest.fixture(scope="module")
def card(default_model_dir) -> ModelCard:
    return ModelCard.model_validate_json((default_model_dir / "card.json").read_text())


@pytest.fixture(scope="module")
def pngs(heldout) -> list[bytes]:
    return [encode(image, "PNG") for image, _ in heldout[:5]]


@pytest.fixture(scope="module")
def analyzed(server, pngs) -> np.ndarray:
    """/analyze's probabilities for each picture: what every Open Inference answer must equal."""
    rows = []
    for png in pngs:
        response = httpx.post(f"{server.url}/analyze", files={"image": ("d.png", png, "image/png")})
        probabilities = response.json()["prediction"]["probabilities"]
        rows.append([probabilities[str(digit)] for digit in range(10)])
    return np.array(rows)


@pytest.fixture(scope="module")
def http_client(server) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.url.removeprefix("http://"))


@pytest.fixture(scope="module")
def grpc_client(server) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(server.grpc_target)


@pytest.fixture(scope="module")
def guarded(trained_store, artifacts):
    """A server with tokens, a rate limit and one request in work at a time (one worker: both
    are per worker)."""
    env = {"API_TOKENS": ",".join(TOKENS), "RATE_LIMIT": "20/minute", "MAX_CONCURRENCY": "1",
           "WORKERS": "1"}  # fmt: skip
    with serve(trained_store, artifacts / "server-triton-guarded.log", env) as running:
        yield running


CLIENTS = {"http": httpclient, "grpc": grpcclient}


def client_of(kind: str, server) -> httpclient.InferenceServerClient:
    url = server.url.removeprefix("http://") if kind == "http" else server.grpc_target
    return CLIENTS[kind].InferenceServerClient(url)


def image_input(kind: str, images: list[bytes], binary: bool = True):
    tensor = CLIENTS[kind].InferInput("image", [len(images)], "BYTES")
    if kind == "http" and not binary:  # JSON carries an image file as base64 text
        tensor.set_data_from_numpy(
            np.array([base64.b64encode(image) for image in images], dtype=object),
            binary_data=False,
        )
    else:
        tensor.set_data_from_numpy(np.array(images, dtype=object))
    return tensor


def outputs(kind: str, binary: bool = True, classification: int = 0) -> list:
    module = CLIENTS[kind]
    if kind == "grpc":
        return [module.InferRequestedOutput("probabilities", class_count=classification),
                module.InferRequestedOutput("label")]  # fmt: skip
    return [module.InferRequestedOutput("probabilities", binary, classification),
            module.InferRequestedOutput("label", binary)]  # fmt: skip


MODES = ["http-binary", "http-json", "grpc"]


def text(element: bytes | str) -> str:
    """A BYTES element as text (binary answers give bytes, JSON answers give str)."""
    return element.decode() if isinstance(element, bytes) else element


def mode_parts(mode: str) -> tuple[str, bool]:
    return mode.split("-")[0], mode != "http-json"


def test_grpc_tools_find_the_health_check_and_the_service_description(server):
    """What Kubernetes' grpc probes and grpc_health_probe ask (grpc.health.v1), and what grpcurl
    reads to call the service without its .proto file (server reflection)."""
    with grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        described = ProtoReflectionDescriptorDatabase(channel)
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= set(
            described.get_services()
        )
        check = DescriptorPool(described).FindServiceByName("grpc.health.v1.Health")
        assert check.methods_by_name["Check"].output_type.name == "HealthCheckResponse"
        service = DescriptorPool(described).FindServiceByName("inference.GRPCInferenceService")
        infer = service.methods_by_name["ModelInfer"]
        assert infer.input_type.full_name == "inference.ModelInferRequest"
        assert "raw_input_contents" in infer.input_type.fields_by_name


def test_grpc_client_side_health_checking_can_watch(server):
    """`Watch` is what gRPC's client-side health checking (`healthCheckConfig`) calls: it was
    UNIMPLEMENTED, with a traceback in the server's log on every call."""
    with grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service, expected in (("", "SERVING"), ("no.such.Service", "SERVICE_UNKNOWN")):
            watching = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=10)
            first = next(watching)
            watching.cancel()
            assert health_pb2.HealthCheckResponse.ServingStatus.Name(first.status) == expected
    assert "NotImplementedError" not in server.log()


@pytest.mark.parametrize("mode", MODES)
def test_health_and_metadata(server, mode, card):
    kind, _ = mode_parts(mode)
    client = client_of(kind, server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "v1")
    # Not served is not ready, on both protocols (gRPC raised NOT_FOUND: a Triton wait loop
    # `while not client.is_model_ready(...)` broke on it).
    assert not client.is_model_ready("no-such-model") and not client.is_model_ready(MODEL, "1")
    metadata = client.get_server_metadata()
    metadata = metadata if isinstance(metadata, dict) else {"extensions": metadata.extensions}
    assert {"binary_tensor_data", "classification"} <= set(metadata["extensions"])
    model = client.get_model_metadata(MODEL)
    if kind == "grpc":
        inputs = {t.name: (t.datatype, list(t.shape)) for t in model.inputs}
        versions = list(model.versions)
    else:
        inputs = {t["name"]: (t["datatype"], t["shape"]) for t in model["inputs"]}
        versions = model["versions"]
    assert versions == ["v1"]
    tensor_shape = [-1, *card.preprocessing.tensor_shape]
    assert inputs == {"image": ("BYTES", [-1]), card.input_name: ("FP32", tensor_shape)}


def test_triton_extensions_not_served_say_so_to_the_http_client(server):
    """tritonclient has a method for each; they got a bare "Not Found", and statistics were
    taken for a model named "stats"."""
    client = httpclient.InferenceServerClient(server.url.split("//")[1])
    for call, says in [
        (client.get_inference_statistics, "statistics extension is not served"),
        (lambda: client.get_inference_statistics(MODEL), "statistics extension"),
        (client.get_model_repository_index, "models are baked into the bento"),
        (lambda: client.load_model(MODEL), "model repository extension"),
        (client.get_system_shared_memory_status, "send tensors in the request body"),
        (client.get_log_settings, "logging extension"),
    ]:
        with pytest.raises(InferenceServerException) as refused:
            call()
        assert refused.value.status() == "404" and says in refused.value.message(), refused.value


@pytest.mark.parametrize("mode", MODES)
def test_images_answer_like_analyze(server, mode, pngs, analyzed, heldout):
    kind, binary = mode_parts(mode)
    client = client_of(kind, server)
    result = client.infer(
        MODEL, [image_input(kind, pngs, binary)], outputs=outputs(kind, binary), request_id="r-42"
    )
    np.testing.assert_allclose(result.as_numpy("probabilities"), analyzed, atol=1e-6)
    labels = [text(label) for label in result.as_numpy("label")]
    assert labels == [str(truth) for _, truth in heldout[:5]]
    response = result.get_response()
    response = response if isinstance(response, dict) else {"id": response.id}
    assert response["id"] == "r-42"


@pytest.mark.parametrize("mode", ["http-gzip", "http-deflate", "grpc-gzip", "grpc-deflate"])
def test_compressed_requests_answer_like_plain_ones(server, mode, pngs, analyzed):
    """tritonclient's request compression: Content-Encoding over HTTP, gRPC's own otherwise."""
    kind, algorithm = mode.split("-")
    client = client_of(kind, server)
    compression = (
        {"request_compression_algorithm": algorithm, "response_compression_algorithm": algorithm}
        if kind == "http"
        else {"compression_algorithm": algorithm}
    )
    result = client.infer(MODEL, [image_input(kind, pngs)], outputs=outputs(kind), **compression)
    np.testing.assert_allclose(result.as_numpy("probabilities"), analyzed, atol=1e-6)


def test_a_gzip_body_of_several_members_is_one_body(server, pngs, analyzed):
    """What `cat a.gz b.gz` and parallel compressors (pigz) make: gzip's own tools read it whole."""
    body = json.dumps({"inputs": [{"name": "image", "shape": [len(pngs)], "datatype": "BYTES",
                                   "data": [base64.b64encode(png).decode() for png in pngs]}],
                       "outputs": [{"name": "probabilities"}]}).encode()  # fmt: skip
    members = b"".join(
        gzip.compress(body[start : start + 1000]) for start in range(0, len(body), 1000)
    )
    response = httpx.post(
        f"{server.url}/v2/models/{MODEL}/infer",
        content=members,
        headers={"content-type": "application/json", "content-encoding": "gzip"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    probabilities = np.array(output["data"], np.float32).reshape(output["shape"])
    np.testing.assert_allclose(probabilities, analyzed, atol=1e-6)


@pytest.mark.parametrize(
    ("encoding", "body", "status", "code"),
    [
        ("br", lambda: b"\x1b\x00", 415, "UNSUPPORTED_MEDIA_TYPE"),
        (("gzip", "br"), lambda: gzip.compress(b"{}"), 415, "UNSUPPORTED_MEDIA_TYPE"),  # 2 lines
        ("gzip", lambda: gzip.compress(b'{"inputs": []}')[:-6], 400, "INVALID_REQUEST"),  # cut
        ("gzip", lambda: gzip.compress(b'{"inputs": []}') + b"junk", 400, "INVALID_REQUEST"),
        ("gzip", lambda: gzip.compress(bytes(120 * 2**20), 1), 413, "PAYLOAD_TOO_LARGE"),
    ],
    ids=[
        "unknown-encoding",
        "two-encoding-headers",
        "truncated",
        "trailing-junk",
        "inflates-past-the-cap",
    ],
)
def test_a_body_that_cannot_be_inflated_gets_a_clear_4xx(server, encoding, body, status, code):
    encodings = [encoding] if isinstance(encoding, str) else encoding
    headers = [("content-type", "application/json")]
    headers += [("content-encoding", value) for value in encodings]
    response = httpx.post(
        f"{server.url}/v2/models/{MODEL}/infer", content=body(), headers=headers, timeout=60
    )
    assert response.status_code == status, response.text
    assert response.headers["x-error-code"] == code


@pytest.mark.parametrize("mode", MODES)
def test_preprocessed_fp32_tensors_answer_like_analyze(server, mode, heldout, card, analyzed):
    kind, binary = mode_parts(mode)
    tensors = np.stack([preprocess(image, card.preprocessing) for image, _ in heldout[:5]])
    tensor = CLIENTS[kind].InferInput(card.input_name, list(tensors.shape), "FP32")
    if kind == "http":
        tensor.set_data_from_numpy(tensors, binary_data=binary)
    else:
        tensor.set_data_from_numpy(tensors)
    result = client_of(kind, server).infer(MODEL, [tensor], outputs=outputs(kind, binary))
    np.testing.assert_allclose(result.as_numpy("probabilities"), analyzed, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_classification_extension_gives_top_k_as_score_index_label(server, mode, pngs, analyzed):
    kind, binary = mode_parts(mode)
    result = client_of(kind, server).infer(
        MODEL, [image_input(kind, pngs, binary)], outputs=outputs(kind, binary, classification=3)
    )
    classes = result.as_numpy("probabilities")
    assert classes.shape == (5, 3)
    for row, expected in zip(classes, analyzed, strict=True):
        parsed = [text(entry).split(":") for entry in row]
        best = np.argsort(-expected, kind="stable")[:3]
        assert [int(index) for _, index, _ in parsed] == list(best)
        assert [label for _, _, label in parsed] == [str(index) for index in best]
        np.testing.assert_allclose([float(score) for score, _, _ in parsed], expected[best],
                                   atol=1e-6)  # fmt: skip


def test_default_calls_of_each_client_work_unchanged(server, pngs, analyzed):
    """No outputs named, nothing turned off: how most Triton client code calls."""
    for kind in CLIENTS:
        result = client_of(kind, server).infer(MODEL, [image_input(kind, pngs[:1])])
        np.testing.assert_allclose(result.as_numpy("probabilities"), analyzed[:1], atol=1e-6)


def expect_error(call: Callable[[], object], kind: str, status: str, code: str) -> str:
    with pytest.raises(InferenceServerException) as raised:
        call()
    error = raised.value
    assert error.status() == status, (error.status(), str(error))
    assert error.message().startswith(f"{code}: "), error.message()
    assert len(error.message()) > len(code) + 10, "a readable reason follows the code"
    return str(error)  # __str__ must work (it broke on the old envelope)


HTTP_AND_GRPC_STATUS = {
    "INVALID_IMAGE": ("422", "StatusCode.INVALID_ARGUMENT"),
    "UNSUPPORTED_MEDIA_TYPE": ("415", "StatusCode.INVALID_ARGUMENT"),
    "NOT_FOUND": ("404", "StatusCode.NOT_FOUND"),
    "PAYLOAD_TOO_LARGE": ("413", "StatusCode.RESOURCE_EXHAUSTED"),
    "INVALID_REQUEST": ("400", "StatusCode.INVALID_ARGUMENT"),
    "UNAUTHORIZED": ("401", "StatusCode.UNAUTHENTICATED"),
    "RATE_LIMITED": ("429", "StatusCode.RESOURCE_EXHAUSTED"),
    "OVERLOADED": ("503", "StatusCode.UNAVAILABLE"),
}


def status_for(kind: str, code: str) -> str:
    return HTTP_AND_GRPC_STATUS[code][0 if kind == "http" else 1]


@pytest.mark.parametrize("kind", CLIENTS)
def test_bad_requests_reach_the_client_with_status_and_code(server, kind, pngs):
    client = client_of(kind, server)
    png = pngs[0]

    def infer(images, model=MODEL, version="", **options):
        return lambda: client.infer(model, [image_input(kind, images)], model_version=version,
                                    **options)  # fmt: skip

    cases = [
        (infer([png[:40]]), "INVALID_IMAGE"),  # a truncated PNG
        (infer([b"<html></html>"]), "UNSUPPORTED_MEDIA_TYPE"),
        (infer([png], model="resnet"), "NOT_FOUND"),
        (infer([png], version="v9"), "NOT_FOUND"),
        (infer([png] * 65), "PAYLOAD_TOO_LARGE"),  # MAX_BATCH_IMAGES is 64
        (infer([b"\xff\xd8" + bytes(11 * 2**20)]), "PAYLOAD_TOO_LARGE"),  # over MAX_UPLOAD_BYTES
        # Each under MAX_UPLOAD_BYTES, together over MAX_BATCH_BYTES (64 MiB): on both transports
        (infer([b"\xff\xd8" + bytes(9 * 2**20)] * 8), "PAYLOAD_TOO_LARGE"),
        (infer([png], outputs=[CLIENTS[kind].InferRequestedOutput("logits")]), "INVALID_REQUEST"),
    ]
    for call, code in cases:
        expect_error(call, kind, status_for(kind, code), code)
    if kind == "grpc":  # gRPC calls are counted by method and outcome, with request ids logged
        client.infer(MODEL, [image_input(kind, [png])], headers={"x-request-id": "grpc-id-7"})
        metrics = httpx.get(f"{server.url}/metrics").text
        ok = 'image_classifier_grpc_requests_total{code="OK",method="ModelInfer"}'
        refused = 'image_classifier_grpc_requests_total{code="NOT_FOUND",method="ModelInfer"}'
        assert metric_value(metrics, ok) >= 1 and metric_value(metrics, refused) >= 2
        assert '"request_id": "grpc-id-7"' in server.log()
        with grpc.insecure_channel(server.grpc_target) as channel:  # the id comes back too
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES")
            tensor.shape.append(1)
            request = pb.ModelInferRequest(model_name=MODEL, inputs=[tensor])
            request.raw_input_contents.append(join_bytes_elements([png]))
            _, call = stub.ModelInfer.with_call(request, metadata=[("x-request-id", "grpc-id-8")])
            request.inputs[0].contents.bytes_contents.append(png)  # raw and typed: the .proto
            with pytest.raises(grpc.RpcError) as both:  # allows one or the other
                stub.ModelInfer(request)
        assert ("x-request-id", "grpc-id-8") in call.trailing_metadata()
        assert both.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not both" in both.value.details()


def test_http_errors_are_the_protocols_shape_with_code_and_request_id_headers(server, pngs):
    response = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=b"{",
                          headers={"x-request-id": "oip-err-1"})  # fmt: skip
    assert response.status_code == 400
    assert response.json()["error"].startswith("INVALID_REQUEST: ")
    assert set(response.json()) == {"error"}
    assert response.headers["x-error-code"] == "INVALID_REQUEST"
    assert response.headers["x-request-id"] == "oip-err-1"
    unknown = httpx.get(f"{server.url}/v2/models/{MODEL}/nothing-here")
    assert unknown.status_code == 404 and unknown.json()["error"].startswith("NOT_FOUND: ")


@pytest.mark.parametrize("kind", CLIENTS)
def test_model_config_is_tritons_on_both_protocols(server, kind, card):
    """What Triton's example clients read before they infer (image_client.py's parse_model):
    max_batch_size, and each tensor's type, dims and the pixel tensor's format. gRPC answered
    UNIMPLEMENTED; HTTP's had no format."""
    config = client_of(kind, server).get_model_config(MODEL, "v1")
    if kind == "grpc":
        config = config.config
        types, formats = model_config_pb2.DataType, model_config_pb2.ModelInput.Format
        inputs = {t.name: (types.Name(t.data_type), list(t.dims), formats.Name(t.format))
                  for t in config.input}  # fmt: skip
        outputs = {t.name: (types.Name(t.data_type), list(t.dims)) for t in config.output}
        name, max_batch_size = config.name, config.max_batch_size
    else:
        inputs = {t["name"]: (t["data_type"], t["dims"], t.get("format", "FORMAT_NONE"))
                  for t in config["input"]}  # fmt: skip
        outputs = {t["name"]: (t["data_type"], t["dims"]) for t in config["output"]}
        name, max_batch_size = config["name"], config["max_batch_size"]
    pixels = list(card.preprocessing.tensor_shape)
    assert name == MODEL
    assert inputs == {
        "image": ("TYPE_STRING", [1], "FORMAT_NONE"),
        card.input_name: ("TYPE_FP32", pixels, f"FORMAT_{card.preprocessing.layout}"),
    }
    assert outputs == {"probabilities": ("TYPE_FP32", [len(card.labels)]),
                       "label": ("TYPE_STRING", [1])}  # fmt: skip
    described = httpx.get(f"{server.url}/v2/models/{MODEL}").json()
    assert max_batch_size == described["parameters"]["max_batch_size"] > 1


def test_tritons_methods_beyond_the_protocol_are_refused_with_the_code_over_grpc(server):
    """Statistics, ModelStreamInfer: grpc's bare "Method not found!" gave no code and no hint
    of what is served."""
    client = client_of("grpc", server)
    call = lambda: client.get_inference_statistics(MODEL)  # noqa: E731
    message = expect_error(call, "grpc", "StatusCode.UNIMPLEMENTED", "METHOD_NOT_ALLOWED")
    assert "ModelInfer" in message and "ModelConfig" in message  # what is served instead
    assert "Repository" not in message  # in the proto, but refused too
    with grpc.insecure_channel(server.grpc_target) as channel:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        with pytest.raises(grpc.RpcError) as refused:
            list(stream(iter([b""]), timeout=10))
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert refused.value.details().startswith("METHOD_NOT_ALLOWED: ModelStreamInfer")


def test_a_method_not_served_is_logged_and_counted_as_every_call_is(server):
    """Refused methods left no access line and no count (a review's finding); a name that is
    not Triton's counts as `unknown`, so made-up names cannot add label values without end."""
    counted = "image_classifier_grpc_requests_total"

    def count(method: str) -> float:
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        return metric_value(metrics, f'{counted}{{code="METHOD_NOT_ALLOWED",method="{method}"}}')

    before = {method: count(method) for method in ("ModelStatistics", "unknown")}
    with grpc.insecure_channel(server.grpc_target) as channel:
        for method, request_id in [("ModelStatistics", "refused-statistics"),
                                   ("NoSuchMethod-7f3a", "refused-made-up")]:  # fmt: skip
            call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
            with pytest.raises(grpc.RpcError) as refused:
                call(b"", timeout=10, metadata=[("x-request-id", request_id)])
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    logged = {line["request_id"]: line for line in access_lines(server.log())}
    assert logged["refused-statistics"]["error_code"] == "METHOD_NOT_ALLOWED"
    assert logged["refused-made-up"]["endpoint"].endswith("/unknown")
    assert {method: count(method) - before[method] for method in before} == {
        "ModelStatistics": 1, "unknown": 1,
    }  # fmt: skip


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_shared_memory_regions_are_refused_not_ignored(server, pngs, kind):
    """An output asked into a region came back inline with 200, while the client would read the
    region (stale data); an input in a region was "no data". Both name the extension now."""
    client, module = client_of(kind, server), CLIENTS[kind]
    into_region = module.InferRequestedOutput("probabilities")
    into_region.set_shared_memory("never-registered", 40)
    status = "400" if kind == "http" else "StatusCode.INVALID_ARGUMENT"
    message = expect_error(
        lambda: client.infer(MODEL, [image_input(kind, pngs[:1])], outputs=[into_region]),
        kind, status, "INVALID_REQUEST",
    )  # fmt: skip
    assert "shared memory" in message
    from_region = module.InferInput("image", [1], "BYTES")
    from_region.set_shared_memory("never-registered", len(pngs[0]))
    message = expect_error(lambda: client.infer(MODEL, [from_region]), kind, status,
                           "INVALID_REQUEST")  # fmt: skip
    assert "shared memory" in message


def test_what_the_http_layer_refuses_on_v2_is_in_the_protocols_shape_too(server, pngs):
    """Heads over the cap and requests the parser cannot read are refused below the routes:
    under /v2 they too answer `{"error": "CODE: ..."}`, which tritonclient can print (its
    `str()` raised TypeError on the envelope)."""
    client = client_of("http", server)
    too_long = {"authorization-extra": "x" * 70_000}  # a long token plus a proxy's headers
    message = expect_error(  # (tritonclient adds its own headers to the dict it is given)
        lambda: client.infer(MODEL, [image_input("http", pngs[:1])], headers=dict(too_long)),
        "http", "431", "HEADERS_TOO_LARGE",
    )  # fmt: skip
    assert "headers" in message
    with socket.create_connection(server.url.removeprefix("http://").split(":")) as raw:
        raw.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\n"
                    "Content-Length: 12, 13\r\n\r\n".encode())  # fmt: skip
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert json.loads(body)["error"].startswith("INVALID_REQUEST: "), body
    analyze = httpx.post(f"{server.url}/analyze", headers=too_long)  # elsewhere: the envelope
    assert analyze.status_code == 431 and analyze.json()["success"] is False


def test_binary_bodies_that_lie_about_their_sizes_get_400(server, pngs):
    header = b'{"inputs":[{"name":"image","shape":[1],"datatype":"BYTES",' \
             b'"parameters":{"binary_data_size":999}}]}'  # fmt: skip
    for body, length in [
        (header + b"\x05\x00\x00\x00abc", len(header)),  # fewer bytes than it claims
        (header, len(header) + 5),  # a header length past the body
        (header.replace(b"999", b"4") + b"\x09\x00\x00\x00", len(header) - 2),  # element cut
    ]:
        response = httpx.post(
            f"{server.url}/v2/models/{MODEL}/infer",
            content=body,
            headers={"inference-header-content-length": str(length)},
        )
        assert response.status_code == 400, response.text
        assert response.headers["x-error-code"] == "INVALID_REQUEST"
    good = header.replace(b"999", b"3") + b"abc"
    twice = [("inference-header-content-length", str(n)) for n in (len(header), len(header) + 1)]
    response = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=good, headers=twice)
    assert response.status_code == 400, response.text  # which split counts is not a guess
    assert "given twice" in response.json()["error"]


def test_bodies_of_millions_of_tiny_values_are_refused_before_they_are_parsed(server, pngs):
    """Found by an attack review: 2 million empty BYTES elements (8 MB) held the worker's event
    loop for 2.2 CPU-s and were then refused for their shape; 42 million JSON zeros took 6 CPU-s
    and 2 GB; a header length in Unicode digits was a 500. Each is refused by count now, over
    HTTP and gRPC alike, and nothing else on the server is held up meanwhile."""
    url = f"{server.url}/v2/models/{MODEL}/infer"
    flood = join_bytes_elements([b""] * 2_000_000)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(flood)},
                }
            ]
        }
    ).encode()
    numbers = b'{"inputs":[{"name":"input","shape":[1,1,28,28],"datatype":"FP32","data":[' \
              + b",".join([b"0"] * 2_000_000) + b"]}]}"  # fmt: skip
    many_objects = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                           "data": [base64.b64encode(pngs[0]).decode()]}],
                               "parameters": {"x": [{}] * 5_000}}).encode()  # fmt: skip
    for body, headers, status, says in [
        (header + flood, {"inference-header-content-length": str(len(header))}, 413, "more than"),
        (numbers, {}, 413, "more values"),
        (gzip.compress(numbers), {"content-encoding": "gzip"}, 413, "more values"),
        (many_objects, {}, 413, "objects"),
        (header, {"inference-header-content-length": "\u00b2"}, 400, "byte count"),
        (header, {"inference-header-content-length": "9" * 5000}, 400, "byte count"),
    ]:
        encoded = {key: value.encode("latin-1") for key, value in headers.items()}
        response = httpx.post(url, content=body, headers=encoded, timeout=60)
        assert response.status_code == status, response.text[:300]
        assert says in response.json()["error"], response.text[:300]
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for datatype, fill in [
            ("BYTES", lambda t, r: r.raw_input_contents.append(join_bytes_elements([b""] * 100))),
            ("BYTES", lambda t, r: t.contents.bytes_contents.extend([b""] * 100_000)),
            ("FP32", lambda t, r: t.contents.fp32_contents.extend([0.0] * 100_000)),
        ]:
            name = "image" if datatype == "BYTES" else "input"
            tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype)
            tensor.shape.extend([1] if datatype == "BYTES" else [1, 1, 28, 28])
            request = pb.ModelInferRequest(model_name=MODEL, inputs=[tensor])
            fill(request.inputs[0], request)
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(request, timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, datatype
            assert refused.value.details().startswith("PAYLOAD_TOO_LARGE: ")
        many_inputs = pb.ModelInferRequest(model_name=MODEL)
        many_inputs.inputs.extend([pb.ModelInferRequest.InferInputTensor(name="x")] * 100_000)
        with pytest.raises(grpc.RpcError) as refused:  # each was read and checked before
            stub.ModelInfer(many_inputs, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "100,000 inputs" in refused.value.details()
        # A 100 KB model name was quoted whole in the status, past the client's 16 KB metadata
        # limit: the client saw "Stream removed", not NOT_FOUND.
        with pytest.raises(grpc.RpcError) as unknown:
            stub.ModelInfer(pb.ModelInferRequest(model_name="n" * 100_000), timeout=30)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert len(unknown.value.details()) < 1100
    assert httpx.get(f"{server.url}/readyz").status_code == 200


@pytest.mark.parametrize("kind", CLIENTS)
def test_tokens_rate_limit_and_overload_reach_the_client(guarded, kind, pngs):
    client = client_of(kind, guarded)

    def infer(token: str | None, images: list[bytes]):
        headers = {"authorization": f"Bearer {token}"} if token else None
        return client_of(kind, guarded).infer(MODEL, [image_input(kind, images)], headers=headers)

    expect_error(lambda: infer(None, pngs[:1]), kind, status_for(kind, "UNAUTHORIZED"),
                 "UNAUTHORIZED")  # fmt: skip
    expect_error(lambda: infer("wrong", pngs[:1]), kind, status_for(kind, "UNAUTHORIZED"),
                 "UNAUTHORIZED")  # fmt: skip
    assert infer(f"reader-{kind}", pngs[:1]).as_numpy("label").shape == (1,)
    assert client.is_server_live()  # health needs no token
    # One request in work at a time: 16 clients at once, some are told to come back.
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        calls = [pool.submit(infer, f"t{n}", pngs * 12) for n in range(16)]
        errors = [call.exception() for call in calls]
    refused = [error for error in errors if error is not None]
    assert refused, "MAX_CONCURRENCY=1 refused none of 16 concurrent calls"
    for error in refused:
        assert error.status() == status_for(kind, "OVERLOADED"), str(error)
        assert error.message().startswith("OVERLOADED: "), error.message()
    assert len(refused) < 16, "every call was refused"
    # 20/minute per token (over both transports: one reader token for each): they run out.
    for _ in range(25):
        try:
            infer(f"reader-{kind}", pngs[:1])
        except InferenceServerException as error:
            assert error.status() == status_for(kind, "RATE_LIMITED"), str(error)
            assert error.message().startswith("RATE_LIMITED: "), error.message()
            break
    else:
        pytest.fail("25 calls within a minute were all allowed under RATE_LIMIT=20/minute")


def test_one_grpc_channel_is_answered_by_every_worker(server, pngs, analyzed):
    """One client object shared by 16 threads (one channel, one connection, held by one worker):
    the calls are spread over both workers of the default server, answers and errors alike reach
    the client unchanged, and every call is answered, and logged, exactly once."""
    client = grpcclient.InferenceServerClient(server.grpc_target)
    bad_calls = {
        "INVALID_IMAGE": dict(images=[pngs[0][:40]]),
        "NOT_FOUND": dict(images=pngs[:1], model_version="v9"),
        "PAYLOAD_TOO_LARGE": dict(images=pngs[:1] * 65),
        "INVALID_REQUEST": dict(
            images=pngs[:1], outputs=[grpcclient.InferRequestedOutput("logits")]
        ),
    }

    def call(number: int) -> str:
        request_id = f"spread-{number}"
        code = list(bad_calls)[number % 20] if number % 20 < len(bad_calls) else None
        options = dict(bad_calls[code]) if code else {"images": [pngs[number % len(pngs)]]}
        tensor = image_input("grpc", options.pop("images"))
        infer = lambda: client.infer(  # noqa: E731
            MODEL, [tensor], headers={"x-request-id": request_id}, **options
        )
        if code:
            expect_error(infer, "grpc", status_for("grpc", code), code)
        else:
            row = infer().as_numpy("probabilities")
            np.testing.assert_allclose(row[0], analyzed[number % len(pngs)], atol=1e-6)
        return request_id

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        sent = list(pool.map(call, range(400)))
    metrics = httpx.get(f"{server.url}/metrics").text
    lines = [line for line in access_lines(server.log()) if line["request_id"] in set(sent)]
    assert sorted(line["request_id"] for line in lines) == sorted(sent)  # each once
    passed = [line for line in lines if "forwarded_by" in line]
    assert len({line["component"] for line in lines}) == 2, "one worker answered them all"
    assert len(passed) >= 40, f"{len(passed)} of 400 calls were sent on to the idler worker"
    assert any(line["status"] == 200 for line in passed)
    assert any(line.get("error_code") for line in passed), "no error came back through a hop"
    assert metric_value(metrics, "image_classifier_grpc_sent_on_total") >= len(passed)


@pytest.mark.parametrize("example", ["triton-http-example", "triton-grpc-example"])
def test_readme_examples_run(server, heldout, tmp_path, example):
    """The README's client snippets, run as written (only the addresses differ)."""
    script = readme_block(example, "python")
    script = script.replace("127.0.0.1:3000", server.url.removeprefix("http://"))
    script = script.replace("127.0.0.1:3001", server.grpc_target)
    image, truth = heldout[4]
    image.save(tmp_path / "digit.png")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    if example == "triton-http-example":  # the best class first: "score:index:label"
        assert f":{truth}:{truth}'" in result.stdout.split()[0], result.stdout
    else:
        assert result.stdout.startswith(f"b'{truth}' 0."), result.stdout


def test_kserve_clients_answer_like_analyze(server, pngs, analyzed, heldout, tmp_path):
    (tmp_path / "digit.png").write_bytes(pngs[0])
    result = subprocess.run(
        [sys.executable, "-m", "tests.http.kserve_calls", server.url, server.grpc_target, MODEL,
         str(tmp_path / "digit.png")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    assert answers["rest_ready"] is True and answers["grpc_ready"] is True
    for mode in ("rest_binary", "rest_json", "grpc"):
        np.testing.assert_allclose(answers[mode]["probabilities"], analyzed[0], atol=1e-6)
        assert answers[mode]["label"] == str(heldout[0][1]), mode
    status, message = answers["rest_error"]
    assert status == 415 and message.startswith("UNSUPPORTED_MEDIA_TYPE: "), answers
    status, message = answers["grpc_error"]
    assert status == "StatusCode.INVALID_ARGUMENT", answers
    assert message.startswith("UNSUPPORTED_MEDIA_TYPE: "), answers
