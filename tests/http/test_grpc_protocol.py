"""The gRPC protocol itself: the generated code matches its .proto (as
`python -m image_classifier.http.protos.regenerate` writes it) and lives beside the clients that
register the same protocol names; against a real server, what the service answers beyond
inference (cancelled calls, unsupported RPCs, the extensions it announces)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import httpx
import psutil
import pytest

from image_classifier.http.grpc_inference import InferenceService
from image_classifier.http.headers import REQUEST_ID_HEADER
from image_classifier.http.protos import grpc_predict_v2_pb2 as pb
from image_classifier.http.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from image_classifier.http.protos.regenerate import GENERATED, PROTO, generate
from image_classifier.serving.open_inference import join_bytes_elements
from loadtest.servers import REPO, serve
from tests.figures import measured
from tests.http.responses import access_lines, assert_no_traceback, metric_value
from tests.pictures import encode

MODEL = "digits-cnn"
GRPC_REQUESTS = "image_classifier_grpc_requests_total"


def test_generated_code_matches_the_proto(tmp_path):
    (tmp_path / PROTO.parent).mkdir(parents=True)
    (tmp_path / PROTO).write_bytes((REPO / PROTO).read_bytes())
    generate(tmp_path)
    for name in GENERATED:
        expected = (tmp_path / PROTO.parent / name).read_text()
        assert (REPO / PROTO.parent / name).read_text() == expected, name


def test_one_process_can_hold_the_service_and_tritons_client():
    """Triton's client registers the same `inference.*` names in protobuf's default pool."""
    script = (
        "import tritonclient.grpc\n"
        "from image_classifier.http.protos import grpc_predict_v2_pb2 as pb\n"
        "request = pb.ModelInferRequest(model_name='m')\n"
        "print(pb.ModelInferRequest.FromString(request.SerializeToString()).model_name)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() == "m", result.stderr


def infer_request(pngs: list[bytes]) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="image", datatype="BYTES", shape=[len(pngs)]
    )
    request = pb.ModelInferRequest(model_name=MODEL, inputs=[tensor])
    request.raw_input_contents.append(join_bytes_elements(pngs))
    return request


def access_line(server, request_id: str, wait_s: float = 3.0) -> dict | None:
    """The access line of one call, once the server has written it (None: not within wait_s)."""
    deadline = time.monotonic() + wait_s
    while True:
        lines = [line for line in access_lines(server.log()) if line["request_id"] == request_id]
        if lines or time.monotonic() > deadline:
            return lines[0] if lines else None
        time.sleep(0.05)


def grpc_requests(server, method: str, code: str) -> float:
    metrics = httpx.get(f"{server.url}/metrics").text
    return metric_value(metrics, f'{GRPC_REQUESTS}{{code="{code}",method="{method}"}}')


def give_up(infer, request: pb.ModelInferRequest, request_id: str, after_s: float, how: str):
    """Make a call and give up on it after `after_s`, by its deadline or by cancelling it; False
    when it was answered first."""
    metadata = [(REQUEST_ID_HEADER, request_id)]
    if how == "CANCELLED":
        call = infer.future(request, metadata=metadata)
        time.sleep(after_s)
        return call.cancel()
    try:
        infer(request, timeout=after_s, metadata=metadata)
    except grpc.RpcError as late:
        assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED, late
        return True
    return False


@pytest.mark.parametrize("how", ["DEADLINE_EXCEEDED", "CANCELLED"])
def test_a_call_the_client_gives_up_on_is_logged_and_counted_so_not_as_ok(server, heldout, how):
    """The server logs it as 499 with how the client gave up, and counts it so: not as a 200 OK
    answer nobody received. A full batch is work that takes a while; the client gives up after a
    quarter of its time, until a call is caught in work (not before the server began it)."""
    request = infer_request([encode(image, "PNG") for image, _ in heldout[:64]])
    with grpc.insecure_channel(server.grpc_target) as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        infer(request)  # warm
        started = time.perf_counter()
        infer(request)
        after_s = (time.perf_counter() - started) / 4
        ok_before, answered = grpc_requests(server, "ModelInfer", "OK"), 0
        for attempt in range(10):
            request_id = f"{how.lower()}-{attempt}"
            if not give_up(infer, request, request_id, after_s, how):
                answered += 1
            elif line := access_line(server, request_id):
                break
        else:
            pytest.fail(f"no call given up on after {after_s:.4f} s had reached the server")
    assert (line["status"], line.get("error_code")) == (499, how), line
    assert grpc_requests(server, "ModelInfer", how) >= 1
    assert grpc_requests(server, "ModelInfer", "OK") == ok_before + answered


@pytest.mark.parametrize("method", ["RepositoryModelLoad", "RepositoryModelUnload"])
def test_model_repository_control_is_refused_quietly(server, method):
    """Models are baked into the bento: UNIMPLEMENTED with the reason, and no traceback."""
    request = getattr(pb, f"{method}Request")(model_name=MODEL)
    logged_before = len(server.log())
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            getattr(stub, method)(request)
        marker = f"after-{method}"  # same channel, same worker: its log is written by now
        stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=[(REQUEST_ID_HEADER, marker)])
    assert access_line(server, marker)
    assert_no_traceback(server.log()[logged_before:])
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "models are baked into the bento" in refused.value.details()


def test_a_message_over_grpcs_size_limit_is_refused_by_grpc_and_logged_without_a_traceback(
    server, heldout
):
    """grpc refuses a message over its size limit itself, before any handler (a gzipped one
    once inflated: 150 MiB of zeros travel as 150 kB) and answers RESOURCE_EXHAUSTED. The
    service still logs and counts the call; its own answer, sent on a call grpc had already
    ended, failed and logged an ExecuteBatchError traceback on 4 calls of 6 in a review (not
    seen again since: grpc's timing decides; `grpc_receiving.py` now ends such a call quietly)."""
    good = infer_request([encode(heldout[0][0], "PNG")])
    bomb = infer_request([bytes(150 * 2**20)])
    logged_before = len(server.log())
    refused = []
    options = [("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(server.grpc_target, options=options) as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        for attempt in range(3):
            infer(good, timeout=30)
            for compression in (grpc.Compression.Gzip, None):
                request_id = f"over-the-limit-{attempt}-{compression}"
                with pytest.raises(grpc.RpcError) as caught:
                    infer(bomb, timeout=60, compression=compression,
                          metadata=[(REQUEST_ID_HEADER, request_id)])  # fmt: skip
                refused.append((caught.value.code(), request_id))
        marker = "after-the-bombs"  # same channel, same worker: its log is written by now
        infer(good, timeout=30, metadata=[(REQUEST_ID_HEADER, marker)])
    assert {code for code, _ in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}, refused
    assert access_line(server, marker)
    assert_no_traceback(server.log()[logged_before:])
    logged = [access_line(server, request_id, wait_s=0) for _, request_id in refused]
    assert [line and line.get("error_code") for line in logged] == ["PAYLOAD_TOO_LARGE"] * 6


def test_every_rpc_of_the_service_is_answered_by_our_own_code():
    """A method left to the generated servicer raises NotImplementedError: a traceback per call."""
    for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        assert method.name in vars(InferenceService), f"{method.name} is the generated default"


def test_grpc_server_metadata_lists_the_extensions_http_lists(server):
    """Each has its method over gRPC too (`model_configuration`: Triton's ModelConfig)."""
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        extensions = list(stub.ServerMetadata(pb.ServerMetadataRequest()).extensions)
    assert extensions == httpx.get(f"{server.url}/v2").json()["extensions"]
    assert {"binary_tensor_data", "classification", "model_configuration"} <= set(extensions)


def test_an_input_without_data_is_named_as_such(server):
    """No raw_input_contents and no contents: the message blamed the shape ("N = 0 elements")."""
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])
    refused = refusal_of(server, pb.ModelInferRequest(model_name=MODEL, inputs=[tensor]))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input image: no data; send raw_input_contents" in refused.details()


@pytest.mark.parametrize(
    "inputs",
    [[], [{"name": "image", "shape": [], "datatype": "BYTES"}],
     [{"name": "image", "shape": [1], "datatype": "bytes"}]],
    ids=["no-inputs", "shape-of-no-dimension", "lower-case-datatype"],
)  # fmt: skip
def test_a_malformed_request_is_refused_in_the_same_words_over_http_and_grpc(server, inputs):
    """HTTP's answers were pydantic's ("List should have at least 1 item after validation",
    a list of every datatype), gRPC's the protocol's own checks."""
    over_http = httpx.post(
        f"{server.url}/v2/models/{MODEL}/infer",
        json={"inputs": [{**tensor, "data": ["aGk="]} for tensor in inputs]},
    )
    tensors = [pb.ModelInferRequest.InferInputTensor(**tensor) for tensor in inputs]
    request = pb.ModelInferRequest(
        model_name=MODEL,
        inputs=tensors,
        raw_input_contents=[join_bytes_elements([b"hi"])] * len(tensors),
    )
    over_grpc = refusal_of(server, request)
    assert over_http.status_code == 400 and over_grpc.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert over_http.json()["error"] == over_grpc.details(), (over_http.text, over_grpc.details())
    assert over_grpc.details().startswith("INVALID_REQUEST: ")


def refusal_of(server, request: pb.ModelInferRequest) -> grpc.RpcError:
    """The error a ModelInfer call is refused with (pytest fails the test if it is answered)."""
    with (
        grpc.insecure_channel(server.grpc_target) as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    return refused.value


TOKEN = "grpc-secret"
BODY_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def guarded(trained_store, artifacts):
    """One worker (its memory is the one measured), tokens on, a short body deadline."""
    env = {"API_TOKENS": TOKEN, "BODY_TIMEOUT_S": str(BODY_TIMEOUT_S), "WORKERS": "1"}
    with serve(trained_store, artifacts / "server-grpc-guarded.log", env) as running:
        yield running


def raw_call(channel: grpc.Channel, method: str) -> grpc.UnaryUnaryMultiCallable:
    """A unary call that sends bytes as they are: what a client that is not grpc's may send."""
    return channel.unary_unary(
        f"/inference.GRPCInferenceService/{method}",
        request_serializer=lambda data: data,
        response_deserializer=lambda data: data,
    )


def peak_rss_mib(server_pid: int) -> float:
    """The highest resident memory each process under the server has had, summed (VmHWM)."""
    total = 0
    for process in psutil.Process(server_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error, OSError, StopIteration):
            status = Path(f"/proc/{process.pid}/status").read_text().splitlines()
            total += int(next(line for line in status if line.startswith("VmHWM")).split()[1])
    return total / 1024


def test_a_grpc_message_is_read_only_after_its_token_and_must_arrive_in_time(guarded):
    """grpc reads a unary call's whole message before its handler runs: 8 calls of 60 MiB
    without a token made a worker hold 1.2 GB to answer UNAUTHENTICATED, a message that stopped
    arriving held its stream for good, and bytes that are not protobuf got UNKNOWN and a
    traceback in the log (`grpc_receiving.py`)."""
    calls, size = 8, 60 * 2**20
    before = peak_rss_mib(guarded.process.pid)
    with grpc.insecure_channel(guarded.grpc_target) as channel:
        infer = raw_call(channel, "ModelInfer")
        futures = [infer.future(bytes(size), timeout=60) for _ in range(calls)]
        refused = [future.exception() for future in futures]
        grown = peak_rss_mib(guarded.process.pid) - before
        assert [e.code() if e else None for e in refused] == [grpc.StatusCode.UNAUTHENTICATED] * 8

        token = [("authorization", f"Bearer {TOKEN}")]
        with pytest.raises(grpc.RpcError) as garbled:
            infer(b"\xff\xff\xff", metadata=token, timeout=10)

        stop_sending = threading.Event()

        def never_sent():
            stop_sending.wait(30)  # the message the client never sends, its stream left open
            yield from ()

        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as stalled:
            channel.stream_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=lambda data: data,
                response_deserializer=lambda data: data,
            )(never_sent(), metadata=token, timeout=30)
        waited = time.monotonic() - started
        stop_sending.set()
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest()).live  # still answering, no token needed
    measured(
        f"gRPC: {calls} ModelInfer calls of {size >> 20} MiB without a token: peak memory of "
        f"the server's processes grew {grown:.0f} MiB; a message never sent cut after "
        f"{waited:.1f} s (BODY_TIMEOUT_S "
        f"{BODY_TIMEOUT_S:g})"
    )
    assert grown < calls * size / 2**20 / 4, grown  # not read whole: a quarter of one each
    assert garbled.value.code() == grpc.StatusCode.INVALID_ARGUMENT, garbled.value
    assert garbled.value.details().startswith("INVALID_REQUEST: not a ModelInfer request")
    assert stalled.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, stalled.value
    assert stalled.value.details().startswith("REQUEST_TIMEOUT: "), stalled.value.details()
    assert BODY_TIMEOUT_S - 0.2 <= waited <= BODY_TIMEOUT_S + 3, waited
    log = guarded.log()
    assert_no_traceback(log)
    codes = Counter(line.get("error_code") for line in access_lines(log))
    assert codes["UNAUTHORIZED"] >= calls and codes["INVALID_REQUEST"] >= 1, codes
    assert codes["REQUEST_TIMEOUT"] >= 1, codes


def test_of_two_tokens_the_first_counts_over_grpc_as_over_http(guarded, heldout):
    png = encode(heldout[0][0], "PNG")
    right, wrong = f"Bearer {TOKEN}", "Bearer not-the-token"
    with grpc.insecure_channel(guarded.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        answered = stub.ModelInfer(
            infer_request([png]), metadata=[("authorization", right), ("authorization", wrong)]
        )
        assert answered.model_name == MODEL
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(
                infer_request([png]), metadata=[("authorization", wrong), ("authorization", right)]
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for first, second, status in [(right, wrong, 200), (wrong, right, 401)]:
        response = httpx.post(
            f"{guarded.url}/analyze",
            files={"image": ("d.png", png, "image/png")},
            headers=[("authorization", first), ("authorization", second)],
            timeout=30,
        )
        assert response.status_code == status, response.text


@pytest.mark.parametrize(
    ("datatype", "shape", "contents"),
    [
        ("BYTES", [1], {"fp32_contents": [1.0, 2.0]}),
        ("FP32", [1, 1, 28, 28], {"bytes_contents": [b"png"]}),
        ("FP32", [1, 1, 28, 28], {"int_contents": [1]}),
    ],
    ids=["bytes-with-fp32", "fp32-with-bytes", "fp32-with-int"],
)
def test_contents_of_another_type_than_the_datatype_are_refused(server, heldout, datatype, shape,
                                                                 contents):  # fmt: skip
    """Typed contents the datatype does not carry its data in were silently ignored (a BYTES
    input with fp32_contents answered OK); Triton refuses them."""
    name, own = ("image", "bytes_contents") if datatype == "BYTES" else ("input", "fp32_contents")
    data = [encode(heldout[0][0], "PNG")] if datatype == "BYTES" else [0.0] * 784
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=name,
        datatype=datatype,
        shape=shape,
        contents=pb.InferTensorContents(**{own: data}, **contents),
    )
    refused = refusal_of(server, pb.ModelInferRequest(model_name=MODEL, inputs=[tensor]))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    expected = f"INVALID_REQUEST: input {name}: a {datatype} input carries its data in {own} only"
    assert refused.details() == expected


def test_classification_sent_as_any_integer_parameter_is_top_k(server, heldout):
    """Triton's proto has InferParameter's uint64_param (5) and double_param (4), which the
    served one lacked: a k sent as uint64_param arrived as an unknown field, and was refused."""
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="image",
        datatype="BYTES",
        shape=[1],
        contents=pb.InferTensorContents(bytes_contents=[encode(heldout[0][0], "PNG")]),
    )
    answers = []
    for parameter in (pb.InferParameter(int64_param=3), pb.InferParameter(uint64_param=3)):
        output = pb.ModelInferRequest.InferRequestedOutputTensor(
            name="probabilities", parameters={"classification": parameter}
        )
        request = pb.ModelInferRequest(model_name=MODEL, inputs=[tensor], outputs=[output])
        with grpc.insecure_channel(server.grpc_target) as channel:
            answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
        answers.append(answer.outputs[0].shape)
    assert answers == [[1, 3], [1, 3]], answers
    fractional = pb.ModelInferRequest.InferRequestedOutputTensor(
        name="probabilities", parameters={"classification": pb.InferParameter(double_param=2.5)}
    )
    refused = refusal_of(
        server, pb.ModelInferRequest(model_name=MODEL, inputs=[tensor], outputs=[fractional])
    )
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.details()
