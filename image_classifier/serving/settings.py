"""All configuration, from environment variables with documented defaults.

Read once per process (`Settings.from_env()`); nothing else in the project reads `os.environ` for
service behaviour. `python -m image_classifier.serving.settings` prints the table below with
current values.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from limits import parse_many as parse_rate_limits
from redis.connection import parse_url

from ..core.classifier import ClassifierOptions
from ..core.decoding import DecodeLimits, PixelBudget, decodable_formats
from .evaluation_record import evaluations_path
from .machine import CpuBudget, cpu_budget, describe_sizing, size_for
from .release_record import (
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_TAG,
    RECORD_ENV,
    read_record,
    record_path,
)

__all__ = ["DEFAULT_MODEL_NAME", "DEFAULT_MODEL_TAG", "Settings", "describe"]

MIB = 1024 * 1024
REDIS_SCHEMES = ("redis://", "rediss://")
# As a browser sends Origin: lower case, no path, no trailing slash. Starlette compares origins as
# strings, so a pattern (https://*.example.com) would only ever match itself: refused.
_ORIGIN = re.compile(
    r"https?://(?:[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.]+\])(?::(?P<port>[0-9]{1,5}))?"
)
# BentoML's tag rules, without importing BentoML here: a name and an optional version, each 1 to 63
# lowercase letters, digits, '-', '_' or '.', with a letter or digit at both ends.
_TAG_PART = r"[a-z0-9](?:[-._a-z0-9]{0,61}[a-z0-9])?"
_MODEL_TAG_FORM = re.compile(rf"{_TAG_PART}(?::{_TAG_PART})?")


def _env(name: str, default: object, doc: str):  # noqa: ANN202 - dataclass field factory
    return field(default=default, metadata={"env": name, "doc": doc})


@dataclass(frozen=True)
class Settings:
    served_model_file: str = _env(
        RECORD_ENV,
        "",
        "the release record that names the served versions (default: served_model.json beside "
        "service.py); a missing file: none promoted yet, the defaults below; its folder must exist",
    )
    model_tag: str = _env(
        "MODEL_TAG",
        DEFAULT_MODEL_TAG,
        "model served, as name:version; a name alone or name:latest serves the newest version "
        "(default: served_model.json)",
    )
    candidate_model_tag: str = _env(
        "CANDIDATE_MODEL_TAG",
        "",
        "a second version served beside it (default: served_model.json's, when MODEL_TAG is "
        "the record's too; blank: none)",
    )
    canary_fraction: float = _env(
        "CANARY_FRACTION", 0.0, "share of unpinned requests the candidate answers (0..1)"
    )
    shadow_fraction: float = _env(
        "SHADOW_FRACTION", 0.0, "share of primary answers the candidate also scores, unseen (0..1)"
    )
    drift_window: int = _env("DRIFT_WINDOW", 500, "predictions in the rolling confidence mean")
    drift_max_drop: float = _env(
        "DRIFT_MAX_DROP", 0.05, "relative fall below the card's mean confidence that alarms"
    )
    cache_size: int = _env("CACHE_SIZE", 0, "duplicate-input cache entries for /analyze (0: off)")
    cache_ttl_s: float = _env("CACHE_TTL_S", 300.0, "how long a cached prediction is reused")
    log_format: str = _env("LOG_FORMAT", "json", "json (one object per line) or text")
    tracing: bool = _env(
        "TRACING", False, "BentoML's OpenTelemetry spans per request (configure an exporter too)"
    )
    max_upload_bytes: int = _env(
        "MAX_UPLOAD_BYTES", 10 * MIB, "largest request body for /analyze (413 above)"
    )
    max_batch_images: int = _env("MAX_BATCH_IMAGES", 64, "most images in one /analyze_batch")
    max_batch_bytes: int = _env(
        "MAX_BATCH_BYTES", 64 * MIB, "largest /analyze_batch body; most image bytes in one infer"
    )
    max_image_pixels: int = _env(
        "MAX_IMAGE_PIXELS", 50_000_000, "most pixels an image may declare (422 above)"
    )
    decoding_pixels: int = _env(
        "DECODING_PIXELS",
        0,
        "most pixels a worker decodes at once, whatever THREADS: its memory bound (0: twice "
        "MAX_IMAGE_PIXELS)",
    )
    allowed_formats: tuple[str, ...] = _env(
        "ALLOWED_FORMATS",
        DecodeLimits.allowed_formats,
        "image formats Pillow may decode (comma-separated)",
    )
    default_top_k: int = _env("DEFAULT_TOP_K", 3, "top_k when a request gives none")
    grade_high: float = _env("GRADE_HIGH", 0.90, "top-1 confidence at or above: grade 'high'")
    grade_medium: float = _env("GRADE_MEDIUM", 0.60, "at or above (below high): grade 'medium'")
    batching: bool = _env(
        "BATCHING", True, "merge concurrent requests' images into one model run, where it pays"
    )
    batching_min_gain: float = _env(
        "BATCHING_MIN_GAIN",
        1.0,
        "merge only if a full run costs this many times less per image than a run of one "
        "(timed at warm-up; 0: always merge)",
    )
    batch_max_size: int = _env(
        "BATCH_MAX_SIZE",
        4,
        "most images in one merged model run (ONNX Runtime keeps memory for the largest: "
        "MobileNetV2 fp32 merging up to 8 grew a worker to 341-353 MB, up to 4 to 295)",
    )
    workers: int = _env(
        "WORKERS", 0, "server processes, each with its own model session (0: from the CPUs)"
    )
    threads: int = _env(
        "THREADS", 0, "threads per worker that decode and run the model (0: from the CPUs)"
    )
    model_runs: int = _env("MODEL_RUNS", 0, "model runs at once per worker (0: from the CPUs)")
    ort_intra_op_threads: int = _env(
        "ORT_INTRA_OP_THREADS", 0, "ONNX Runtime threads per model run (0: from the CPUs)"
    )
    ort_solo_threads: int = _env(
        "ORT_SOLO_THREADS",
        0,
        "ONNX Runtime threads for an image that runs alone, at low load (0: from the CPUs; 1: off)",
    )
    gil_switch_interval_ms: float = _env(
        "GIL_SWITCH_INTERVAL_MS",
        1.0,
        "longest a thread keeps Python's interpreter lock while another waits for it (Python's "
        "own: 5)",
    )
    thread_nice: int = _env(
        "THREAD_NICE",
        5,
        "how much lower than the event loop the THREADS are scheduled (Linux nice, 0-19; 0: the "
        "same)",
    )
    max_concurrency: int = _env(
        "MAX_CONCURRENCY", 128, "requests in work at once per worker (503 OVERLOADED above)"
    )
    request_timeout_s: float = _env(
        "REQUEST_TIMEOUT_S", 30.0, "a request still in work after this gets 504 TIMEOUT"
    )
    body_timeout_s: float = _env(
        "BODY_TIMEOUT_S", 10.0, "an upload body still arriving after this gets 408 REQUEST_TIMEOUT"
    )
    body_min_bytes_per_s: int = _env(
        "BODY_MIN_BYTES_PER_S",
        1024,
        "from half of BODY_TIMEOUT_S on, an upload body slower than this on average gets 408",
    )
    max_receiving: int = _env(
        "MAX_RECEIVING",
        512,
        "upload bodies arriving at once per worker, apart from the requests in work (503 above)",
    )
    max_body_memory: int = _env(
        "MAX_BODY_MEMORY",
        512 * MIB,
        "request body bytes held at once per worker, arriving or in work (503 above; one "
        "request alone is always let in)",
    )
    max_receiving_per_client: int = _env(
        "MAX_RECEIVING_PER_CLIENT",
        64,
        "upload bodies arriving at once from one client (token, else address; 429 above)",
    )
    api_tokens: tuple[str, ...] = _env(
        "API_TOKENS", (), "bearer tokens the APIs accept (comma-separated); empty: no auth"
    )
    cors_origins: tuple[str, ...] = _env(
        "CORS_ORIGINS",
        (),
        "origins whose browser pages may call the API (comma-separated, e.g. "
        "https://app.example.com; * for any); empty: the same origin only (the /ui page)",
    )
    rate_limit: str = _env(
        "RATE_LIMIT",
        "",
        "per-client limit, e.g. '20/second', or several a request must each pass, "
        "'20/second;500/hour' (key: token, else address); off",
    )
    redis_url: str = _env(
        "REDIS_URL",
        "",
        "Redis shared by all replicas for RATE_LIMIT and the cache, e.g. redis://host:6379/0; off",
    )
    grpc_port: int = _env(
        "GRPC_PORT", 3001, "Open Inference gRPC port, served by every worker (0: no gRPC)"
    )
    shutdown_grace_s: float = _env(
        "SHUTDOWN_GRACE_S", 20.0, "on SIGTERM, time to finish accepted requests before exit"
    )
    # Not read from the environment: how the process and thread counts were chosen (/info).
    sizing: str = field(default="", compare=False)
    over_the_cpus: str = field(default="", compare=False)  # why the counts oversubscribe, if so
    # Beside the release record: saved evaluations, whose latest is merged into a served card.
    evaluations_file: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        formats = tuple(fmt.upper() for fmt in self.allowed_formats)
        object.__setattr__(self, "allowed_formats", formats)

    def classifier_options(self) -> ClassifierOptions:
        return ClassifierOptions(
            allowed_formats=self.allowed_formats,
            max_image_pixels=self.max_image_pixels,
            max_batch=self.batch_max_size,
            intra_op_threads=self.ort_intra_op_threads,
            solo_threads=self.ort_solo_threads,
            default_top_k=self.default_top_k,
            grade_high=self.grade_high,
            grade_medium=self.grade_medium,
        )

    def decoding_budget(self) -> PixelBudget:
        """One per worker, shared by its models: pictures decoded at once, in pixels."""
        return PixelBudget(self.decoding_pixels or 2 * self.max_image_pixels)

    def sized(self, budget: CpuBudget) -> Settings:
        """The settings with every process and thread count left at 0 taken from the CPUs."""
        chosen = size_for(budget, workers=self.workers)
        auto = {name: getattr(chosen, name) for name in _SIZED if getattr(self, name) == 0}
        given = [f"{_env_name(name)}={getattr(self, name)}" for name in _SIZED if name not in auto]
        final = replace(self, **auto)
        sizing = describe_sizing(budget, *(getattr(final, name) for name in _SIZED))
        sizing += f"; set in the environment: {', '.join(given)}" if given else ""
        at_once = final.workers * final.model_runs * final.ort_intra_op_threads
        over = (
            f"{final.workers} worker(s) x {final.model_runs} model run(s) x "
            f"{final.ort_intra_op_threads} ONNX Runtime thread(s) = {at_once} model threads at "
            f"once on {budget.cpus} usable CPU(s): they take turns, answers come later, and "
            f"each worker holds its own copy of the model in memory"
            if at_once > budget.cpus
            else ""
        )
        sizing += f"; over the CPUs: {over}" if over else ""
        return replace(final, sizing=sizing, over_the_cpus=over)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        values = {}
        for spec in _env_fields():
            raw = environ.get(spec.metadata["env"])
            if raw is not None and raw.strip() == "" and spec.name in _NEVER_BLANK:
                # An empty Secret would silently open the API: a mistake, not "no auth".
                raise ValueError(f"{spec.metadata['env']} is set but blank; unset it for none")
            if raw is None or raw.strip() == "":
                continue  # VAR= (compose files, templates): the default
            values[spec.name] = _parse(spec.metadata["env"], raw.strip(), spec.default)
            if values[spec.name] == ():  # e.g. API_TOKENS=" , ": not "no tokens", a mistake
                raise ValueError(f"{spec.metadata['env']}={raw!r} is set but names nothing")
        record = read_record(record_path(environ))
        values.setdefault("model_tag", record.model_tag)
        # The record's candidate goes with the record's model: MODEL_TAG naming another one, or a
        # blank CANDIDATE_MODEL_TAG, serves no candidate (it could not be turned off before).
        if (
            _env_name("candidate_model_tag") not in environ
            and values["model_tag"] == record.model_tag
        ):
            values["candidate_model_tag"] = record.candidate_tag or ""
        values["evaluations_file"] = evaluations_path(environ)
        settings = cls(**values).sized(cpu_budget())
        settings.validate()
        return settings

    @classmethod
    def at_start(cls) -> Settings:
        """`from_env` for a starting server: a bad value stops it with one line that names it,
        not a traceback through BentoML's loader."""
        try:
            return cls.from_env()
        except ValueError as exc:
            raise start_refused(f"configuration error: {exc}") from None

    def validate(self) -> None:
        positive = (
            "max_upload_bytes",
            "max_batch_images",
            "max_batch_bytes",
            "max_image_pixels",
            "default_top_k",
            "batch_max_size",
            "max_concurrency",
            "body_min_bytes_per_s",
            "max_receiving",
            "max_receiving_per_client",
            "max_body_memory",
            "drift_window",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{_env_name(name)} must be >= 1, got {getattr(self, name)}")
        for name in _SIZED:  # 0 was taken from the CPUs by `sized`
            if getattr(self, name) < 0:
                raise ValueError(
                    f"{_env_name(name)} must be >= 0 (0: from the CPUs), got {getattr(self, name)}"
                )
        for name, most in _MOST.items():
            value = getattr(self, name)
            if value > most:
                raise ValueError(f"{_env_name(name)} must be <= {most:,}, got {value}")
        if not 0 <= self.grade_medium <= self.grade_high <= 1:
            raise ValueError(
                "need 0 <= GRADE_MEDIUM <= GRADE_HIGH <= 1, got "
                f"GRADE_MEDIUM={self.grade_medium:g}, GRADE_HIGH={self.grade_high:g}"
            )
        if not 0 <= self.grpc_port <= 65535:
            raise ValueError(f"GRPC_PORT must be a port number (0: off), got {self.grpc_port}")
        if self.request_timeout_s <= 0 or self.shutdown_grace_s < 0:
            raise ValueError("REQUEST_TIMEOUT_S must be > 0 and SHUTDOWN_GRACE_S >= 0")
        if not 0 < self.body_timeout_s <= self.request_timeout_s:
            raise ValueError(
                "BODY_TIMEOUT_S must be > 0 and at most REQUEST_TIMEOUT_S, got "
                f"BODY_TIMEOUT_S={self.body_timeout_s:g}, "
                f"REQUEST_TIMEOUT_S={self.request_timeout_s:g}"
            )
        if self.max_upload_bytes > self.max_batch_bytes:  # an image /analyze takes, batches refuse
            raise ValueError(
                f"MAX_UPLOAD_BYTES={self.max_upload_bytes} must be at most "
                f"MAX_BATCH_BYTES={self.max_batch_bytes}"
            )
        if self.max_receiving_per_client > self.max_receiving:  # else one client could fill it
            raise ValueError(
                f"MAX_RECEIVING_PER_CLIENT={self.max_receiving_per_client} must be at most "
                f"MAX_RECEIVING={self.max_receiving}"
            )
        if self.max_body_memory < self.max_upload_bytes:  # the largest upload only ever alone
            raise ValueError(
                f"MAX_BODY_MEMORY={self.max_body_memory} must be at least "
                f"MAX_UPLOAD_BYTES={self.max_upload_bytes}"
            )
        if not 0 < self.gil_switch_interval_ms <= 100:
            raise ValueError("GIL_SWITCH_INTERVAL_MS must be > 0 and at most 100")
        if not 0 <= self.thread_nice <= 19:
            raise ValueError(f"THREAD_NICE must be between 0 and 19, got {self.thread_nice}")
        if self.batching_min_gain < 0:
            raise ValueError(f"BATCHING_MIN_GAIN must be >= 0, got {self.batching_min_gain}")
        if self.decoding_pixels < 0:
            raise ValueError(
                f"DECODING_PIXELS must be >= 0 (0: twice MAX_IMAGE_PIXELS), got "
                f"{self.decoding_pixels}"
            )
        if self.cache_size < 0 or self.cache_ttl_s <= 0:
            raise ValueError("CACHE_SIZE must be >= 0 and CACHE_TTL_S > 0")
        if not (0 <= self.canary_fraction <= 1 and 0 <= self.shadow_fraction <= 1):
            raise ValueError("CANARY_FRACTION and SHADOW_FRACTION must be between 0 and 1")
        if not 0 < self.drift_max_drop < 1:
            raise ValueError("DRIFT_MAX_DROP must be between 0 and 1")
        if self.log_format not in ("json", "text"):
            raise ValueError("LOG_FORMAT must be 'json' or 'text'")
        _check_model_tag("MODEL_TAG", self.model_tag)
        if self.candidate_model_tag:
            _check_model_tag(_env_name("candidate_model_tag"), self.candidate_model_tag)
            if self.candidate_model_tag == self.model_tag:
                raise ValueError("CANDIDATE_MODEL_TAG must differ from MODEL_TAG")
        if self.redis_url and not self.redis_url.startswith(REDIS_SCHEMES):
            raise ValueError(f"REDIS_URL must start with one of {', '.join(REDIS_SCHEMES)}")
        if self.redis_url:  # read by redis' own parser now, not by the first request or limit
            try:
                parse_url(self.redis_url)
            except ValueError as exc:  # its words name the part, never the password
                raise ValueError(f"REDIS_URL is not a Redis URL: {exc}") from None
        for origin in self.cors_origins:
            if origin != "*" and not _is_origin(origin):
                raise ValueError(
                    f"CORS_ORIGINS: {origin!r} is not an origin (scheme://host[:port] in lower "
                    "case, e.g. https://app.example.com, or * for any; no patterns)"
                )
        if self.rate_limit:
            try:
                amounts = [rate.amount for rate in parse_rate_limits(self.rate_limit)]
            except ValueError:
                amounts = [0]
            if min(amounts) < 1:
                raise ValueError(
                    f"RATE_LIMIT={self.rate_limit!r}: use e.g. '20/second', or "
                    "'20/second;500/hour' for several"
                )
        unknown = sorted(set(self.allowed_formats) - decodable_formats())
        if unknown:
            raise ValueError(
                f"ALLOWED_FORMATS names {', '.join(unknown)}, which Pillow does not decode here "
                f"(it does: {', '.join(sorted(decodable_formats()))})"
            )


def _check_model_tag(variable: str, tag: str) -> None:
    """Here, in one line that names the variable, not as BentoML's traceback at model load."""
    if not _MODEL_TAG_FORM.fullmatch(tag):
        raise ValueError(
            f"{variable}={tag!r} is not a model tag: use name:version, each 1 to 63 lowercase "
            "letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        )


def start_refused(message: str) -> SystemExit:
    """The one line a server that cannot start writes before it exits with status 1: a JSON
    line like all the others (log pipelines drop or garble plain text), unless LOG_FORMAT=text.
    Read from the raw environment: the settings themselves may be what is wrong."""
    if os.environ.get("LOG_FORMAT", "").strip().lower() == "text":
        return SystemExit(message)
    line = {"level": "ERROR", "logger": "image_classifier.start", "message": message,
            "timestamp": datetime.now(UTC).isoformat()}  # fmt: skip
    return SystemExit(json.dumps(line))


_SIZED = ("workers", "threads", "model_runs", "ort_intra_op_threads", "ort_solo_threads")
_NEVER_BLANK = {"api_tokens"}
# Upper bounds: far past any real use, so that a stray digit is named at start, not met later as
# an ONNX Runtime or memory error that names no variable (every other int fits 32 bits).
_MOST_COUNT = 1024  # processes, threads, images in one run
_MOST = {
    **dict.fromkeys(_SIZED, _MOST_COUNT),
    "batch_max_size": _MOST_COUNT,
    "max_batch_images": 100_000,
    "default_top_k": 100_000,
    **dict.fromkeys(
        (
            "max_upload_bytes", "max_batch_bytes", "max_image_pixels", "drift_window",
            "cache_size", "max_concurrency", "max_receiving", "max_receiving_per_client",
            "body_min_bytes_per_s",
        ),
        2**31 - 1,
    ),
    "max_body_memory": 2**40,
    "decoding_pixels": 2**40,
}  # fmt: skip


def _is_origin(origin: str) -> bool:
    match = _ORIGIN.fullmatch(origin)
    return match is not None and 1 <= int(match["port"] or 443) <= 65535


def _env_fields() -> list:
    return [spec for spec in fields(Settings) if "env" in spec.metadata]


def variable_names() -> set[str]:
    """Every environment variable the service reads."""
    return {spec.metadata["env"] for spec in _env_fields()}


def _env_name(attribute: str) -> str:
    return next(f.metadata["env"] for f in _env_fields() if f.name == attribute)


def _parse(name: str, raw: str, default: object) -> object:
    try:
        if isinstance(default, bool):
            lowered = raw.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            value = float(raw)
            if not math.isfinite(value):  # NaN passes every comparison a check would make
                raise ValueError(raw)
            return value
        if isinstance(default, tuple):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        return raw
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {type(default).__name__}") from None


def describe() -> str:
    """The configuration table with current values (printed when this module is run)."""
    current = Settings.from_env()
    rows = [f"{'variable':<22} {'default':<40} {'current':<40} meaning"]
    for spec in _env_fields():
        default = spec.default
        value = getattr(current, spec.name)
        if spec.name == "api_tokens" and value:
            value = f"({len(value)} set)"  # never print a secret
        elif spec.name == "redis_url" and urlsplit(value).password:
            value = value.replace(f":{urlsplit(value).password}@", ":***@", 1)
        rows.append(
            f"{spec.metadata['env']:<22} {default!s:<40} {value!s:<40} {spec.metadata['doc']}"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(describe())
