"""The generated gRPC code matches its .proto (as
`python -m image_classifier.http.protos.regenerate` writes it) and lives beside the clients
that register the same protocol names."""

from __future__ import annotations

import subprocess
import sys

from image_classifier.http.protos.regenerate import GENERATED, PROTO, generate
from loadtest.servers import REPO


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
