"""KServe's Open Inference gRPC protocol (grpc_predict_v2.proto) and the code generated from it
by `python -m image_classifier.http.protos.regenerate` (tests/http/test_grpc_protocol.py checks
that they match)."""
