"""Regenerate the gRPC code from grpc_predict_v2.proto (needs grpcio-tools, a test dependency):

    python -m image_classifier.http.protos.regenerate

The messages go to a descriptor pool of their own, not protobuf's default one: Triton's and
KServe's clients register the same `inference.*` names in the default pool, and a process that
imports one of them (a test, a gateway, a notebook serving in-process) could not import this too.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROTO = Path("image_classifier/http/protos/grpc_predict_v2.proto")
GENERATED = ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py")
_DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
_OWN_POOL = "_descriptor_pool.DescriptorPool().AddSerializedFile("


def generate(root: Path) -> None:
    """Write the generated files under `root` (the repository, or a copy holding the .proto)."""
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--pyi_out=.",
         "--grpc_python_out=.", str(PROTO)],
        cwd=root, check=True,
    )  # fmt: skip
    messages = root / PROTO.parent / GENERATED[0]
    code = messages.read_text()
    if code.count(_DEFAULT_POOL) != 1:
        raise RuntimeError(f"{messages}: expected one {_DEFAULT_POOL!r}; protoc's output changed")
    messages.write_text(code.replace(_DEFAULT_POOL, _OWN_POOL))


if __name__ == "__main__":
    generate(Path(__file__).resolve().parents[3])
