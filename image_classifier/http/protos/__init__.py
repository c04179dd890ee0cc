"""KServe's Open Inference gRPC protocol and the code `grpc_tools.protoc` generates from it.

Regenerate after changing the .proto (tests/http/test_grpc_protocol.py checks they match):

    python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
        image_classifier/http/protos/grpc_predict_v2.proto
"""
