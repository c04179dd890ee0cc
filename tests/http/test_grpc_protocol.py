"""The generated gRPC code matches its .proto (regenerate it as the package docstring says)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from loadtest.servers import REPO

PROTOS = Path("image_classifier/http/protos")
GENERATED = ["grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py"]


def test_generated_code_matches_the_proto(tmp_path):
    (tmp_path / PROTOS).mkdir(parents=True)
    (tmp_path / PROTOS / "grpc_predict_v2.proto").write_bytes(
        (REPO / PROTOS / "grpc_predict_v2.proto").read_bytes()
    )
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--pyi_out=.",
         "--grpc_python_out=.", str(PROTOS / "grpc_predict_v2.proto")],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for name in GENERATED:
        assert (tmp_path / PROTOS / name).read_text() == (REPO / PROTOS / name).read_text(), name
