"""One worker's request path, framework-free: from an upload's bytes to its answer.

The predictor (routing, cache, decode threads, batching, shadow scoring), drift, metrics, the
settings read from the environment and the release record. Imports `core`, never `http`.
"""
