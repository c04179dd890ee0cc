"""Prometheus metrics of the service (served on BentoML's /metrics beside its own).

BentoML runs prometheus_client in multiprocess mode (one file per worker, merged at scrape), so
every gauge says how worker values merge; `live*` modes drop a worker's values when it exits
cleanly, and `forget_dead_workers` drops those of a worker that was killed.
Request counts and latency per endpoint and status are BentoML's own
(`bentoml_service_request_total`, `bentoml_service_request_duration_seconds`).
"""

from __future__ import annotations

import os

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.multiprocess import mark_process_dead

from ..core.errors import ClassifierError
from ..core.postprocessing import Prediction
from . import worker_state
from .drift import DriftState

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
# Up to the default BODY_TIMEOUT_S and REQUEST_TIMEOUT_S, where a body or a wait is cut: past 2.5 s,
# every slow upload and every long queue wait fell in +Inf.
_SECONDS_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


def _shown_from_zero(counter: Counter, label_values: tuple[str, ...]) -> Counter:
    """The counter with a series at 0 for each value of its one label from the start, so alerts
    and dashboards see them before the first event."""
    for value in label_values:
        counter.labels(value)
    return counter


MODEL_INFO = Gauge(
    "image_classifier_model_info",
    "Models this service answers with (value 1), by role: primary or candidate",
    ["name", "version", "role"],
    multiprocess_mode="livemax",
)
READY = Gauge(
    "image_classifier_ready",
    "1 when this worker's models are loaded and warm and it is not draining (one per worker)",
    multiprocess_mode="liveall",
)
MODEL_RUNS = Counter(
    "image_classifier_model_runs", "ONNX Runtime runs (one per merged batch)", ["model_version"]
)
MODEL_RUN_ITEMS = Histogram(
    "image_classifier_model_run_items",
    "Images per ONNX Runtime run: the real batch size",
    ["model_version"],
    buckets=_BATCH_BUCKETS,
)
INFERENCE_SECONDS = Histogram(
    "image_classifier_inference_seconds",
    "Time of one ONNX Runtime run (a whole merged batch)",
    ["model_version"],
    buckets=_SECONDS_BUCKETS,
)
PREPROCESS_SECONDS = Histogram(
    "image_classifier_preprocess_seconds",
    "Decode + validate + preprocess time of one image",
    buckets=_SECONDS_BUCKETS,
)
# The stages of a request beside preprocess and inference: where the time goes under load.
BODY_SECONDS = Histogram(
    "image_classifier_body_receive_seconds",
    "Receiving an upload's body, from its first read to its last byte",
    buckets=_SECONDS_BUCKETS,
)
QUEUE_WAIT_SECONDS = Histogram(
    "image_classifier_queue_wait_seconds",
    "An image's wait for a model run, from its tensor being ready to the run's start",
    buckets=_SECONDS_BUCKETS,
)
RESPOND_SECONDS = Histogram(
    "image_classifier_respond_seconds",
    "Writing an answer: from the api's response to its last byte handed to the server",
    buckets=_SECONDS_BUCKETS,
)
PREDICTIONS = Counter(
    "image_classifier_predictions", "Predictions by label", ["label", "model_version"]
)
CONFIDENCE = Histogram(
    "image_classifier_top1_confidence",
    "Top-1 confidence of answers",
    ["model_version"],
    buckets=_CONFIDENCE_BUCKETS,
)
ERRORS = Counter("image_classifier_errors", "Error responses by error code", ["code"])
REFUSED_AT_HEAD = _shown_from_zero(
    Counter(
        "image_classifier_refused_at_head",
        "Requests refused by the HTTP protocol as soon as their head was read (overload, "
        "draining), by code; they never reach BentoML, whose request metrics do not count them",
        ["code"],
    ),
    ("OVERLOADED", "SHUTTING_DOWN"),
)
GRPC_REQUESTS = Counter(
    "image_classifier_grpc_requests",
    "Open Inference gRPC calls by method and outcome (OK, the error code, or CANCELLED / "
    "DEADLINE_EXCEEDED when the client gave up); BentoML's request metrics count HTTP only",
    ["method", "code"],
)
GRPC_IN_WORK = Gauge(
    "image_classifier_grpc_infer_in_work",
    "ModelInfer calls admitted and in work, in the worker answering them (HTTP requests in "
    "progress are BentoML's bentoml_service_request_in_progress)",
    multiprocess_mode="livesum",
)
GRPC_SENT_ON = Counter(
    "image_classifier_grpc_sent_on",
    "ModelInfer calls this worker received and another, less busy worker answered (one gRPC "
    "channel is one connection, held by one worker)",
)
ITEM_ERRORS = Counter(
    "image_classifier_batch_item_errors", "Refused images inside /analyze_batch by code", ["code"]
)
DRIFT_BASELINE = Gauge(
    "image_classifier_drift_baseline_confidence",
    "Mean top-1 confidence on held-out data, from the model card",
    ["model_version"],
    multiprocess_mode="livemax",
)
DRIFT_MEAN = Gauge(
    "image_classifier_drift_rolling_confidence",
    "Mean top-1 confidence of the last DRIFT_WINDOW answers (per worker)",
    ["model_version"],
    multiprocess_mode="liveall",
)
DRIFT_CHANGE = Gauge(
    "image_classifier_drift_relative_change",
    "(rolling mean - baseline) / baseline; the lowest worker's value",
    ["model_version"],
    multiprocess_mode="livemin",
)
DRIFT_ALARM = Gauge(
    "image_classifier_drift_alarm",
    "1 when the rolling mean is more than DRIFT_MAX_DROP below the baseline (any worker)",
    ["model_version"],
    multiprocess_mode="livemax",
)
CACHE_LOOKUPS = Counter(
    "image_classifier_cache_lookups",
    "Duplicate-input cache lookups of /analyze, by result: hit or miss (CACHE_SIZE > 0 only)",
    ["result"],
)
SHARED_CACHE_HITS = Counter(
    "image_classifier_shared_cache_hits",
    "Cache hits found in Redis, answered before by another worker or replica (REDIS_URL only)",
)
SHARED_STATE_ERRORS = _shown_from_zero(
    Counter(
        "image_classifier_shared_state_errors",
        "Failed Redis calls, by part (rate_limit, cache); the service went on without Redis",
        ["part"],
    ),
    ("rate_limit", "cache"),
)
SHADOW_COMPARISONS = Counter(
    "image_classifier_shadow_comparisons",
    "Primary answers the candidate also scored in shadow, by whether the top-1 labels agreed",
    ["candidate_version", "agreed"],
)


def observe_model_loaded(name: str, version: str, role: str, baseline: float | None) -> None:
    MODEL_INFO.labels(name=name, version=version, role=role).set(1)
    DRIFT_ALARM.labels(model_version=version).set(0)
    if baseline is not None:
        DRIFT_BASELINE.labels(model_version=version).set(baseline)


def observe_model_run(items: int, seconds: float, model_version: str) -> None:
    MODEL_RUNS.labels(model_version=model_version).inc()
    MODEL_RUN_ITEMS.labels(model_version=model_version).observe(items)
    INFERENCE_SECONDS.labels(model_version=model_version).observe(seconds)


def observe_prediction(prediction: Prediction, model_version: str) -> None:
    PREDICTIONS.labels(label=prediction.label, model_version=model_version).inc()
    CONFIDENCE.labels(model_version=model_version).observe(prediction.confidence)


def observe_drift(model_version: str, state: DriftState) -> None:
    if state.rolling_mean is not None:
        DRIFT_MEAN.labels(model_version=model_version).set(state.rolling_mean)
    if state.relative_change is not None:
        DRIFT_CHANGE.labels(model_version=model_version).set(state.relative_change)
    DRIFT_ALARM.labels(model_version=model_version).set(1 if state.alarm else 0)


def observe_item_error(error: ClassifierError) -> None:
    ITEM_ERRORS.labels(code=error.code.value).inc()


def observe_shadow(candidate_version: str, agreed: bool) -> None:
    SHADOW_COMPARISONS.labels(candidate_version=candidate_version, agreed=str(agreed).lower()).inc()


EVENT_LOOP_LAG_SECONDS = Histogram(
    "image_classifier_event_loop_lag_seconds",
    "How late the worker's event loop ran a timer that was due: every request of the worker, "
    "refusals and probes included, waits as long",
    buckets=_SECONDS_BUCKETS,
)
GC_PAUSE_SECONDS = Histogram(
    "image_classifier_gc_pause_seconds",
    "Garbage collections by generation: each holds every request of its worker while it runs",
    ["generation"],
    buckets=_SECONDS_BUCKETS,
)
GC_COLLECTED = _shown_from_zero(
    Counter(
        "image_classifier_gc_collected_objects",
        "Objects that only the garbage collector could free (reference cycles), by generation: "
        "a request that leaves such garbage makes every worker's collections longer",
        ["generation"],
    ),
    ("0", "1", "2"),
)
WORKERS_REPLACED = Counter(
    "image_classifier_workers_replaced",
    "Worker processes that died without shutting down (killed, out of memory) and were replaced",
)


def forget_dead_workers() -> list[int]:
    """The pids of workers that died without shutting down, counted in WORKERS_REPLACED; call
    when a worker starts (its replacement does). Every gone worker's live gauges are removed, and
    one that drained and exited (a reload on SIGHUP replaces them all) is not a death.

    prometheus_client keeps a killed process's files, so its `ready` gauge would read 1 for ever
    (measured: after a SIGKILL, /metrics showed 3 ready workers of 2)."""
    directory = worker_state.directory()
    if directory is None:
        return []
    pids = {int(file.stem.rsplit("_", 1)[1]) for file in directory.glob("gauge_live*_*.db")}
    gone = sorted(pid for pid in pids if pid != os.getpid() and not worker_state.alive(pid))
    dead = [pid for pid in gone if not worker_state.exited(pid)]  # not drained after SIGTERM
    for pid in gone:
        mark_process_dead(pid, str(directory))
    WORKERS_REPLACED.inc(len(dead))
    return dead
