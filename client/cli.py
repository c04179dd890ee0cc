"""`python -m client classify DIR --out results.jsonl`: classify a folder tree, resumably.

Images go through /analyze_batch in chunks sized from the server's /info limits, a few chunks at
once. Each image gets one JSON line in the output, written as soon as its chunk comes back, so an
interrupted run loses nothing: the next run skips every path already in the file.

Exit status: 0 every image classified, 1 some failed, 2 usage error or server unreachable.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO, TypeVar

from tqdm import tqdm

from .errors import RETRYABLE, ClassifierClientError, Unauthorized, Unreachable
from .typed import DEFAULT_URL, BatchResult, ImageClassifierClient, Limits

DEFAULT_EXTENSIONS = "jpg,jpeg,png,webp,gif,bmp,tif,tiff"
COLUMNS = ["path", "label", "confidence", "grade", "model_version", "error", "message"]
MAX_ATTEMPTS = 8  # per chunk, for 429 and 503 answers
BACKOFF_BASE_S = 0.5  # attempt n waits at least BACKOFF_BASE_S * 2**n, and Retry-After if longer
BACKOFF_MAX_S = 30.0
# Room for each file's multipart headers (boundary, Content-Disposition with the file name,
# Content-Type), so a chunk's body stays under max_batch_bytes.
PART_OVERHEAD_BYTES = 1024

Record = dict[str, object]
T = TypeVar("T")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return classify(args)
    except ClassifierClientError as exc:  # unreachable, token refused, /info refused
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: what came back is in {args.out}; run again to resume", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("classify", help="classify every image under a folder")
    run.add_argument("dir", type=_existing_dir, help="folder to walk (recursively)")
    run.add_argument("--out", type=Path, required=True, help="JSON Lines results (appended)")
    run.add_argument("--csv", type=Path, help="also write all results as CSV")
    run.add_argument("--url", default=DEFAULT_URL)
    run.add_argument("--token", help="API token, when the server sets API_TOKENS")
    run.add_argument("--batch-size", type=_positive, default=16, help="images per request")
    run.add_argument("--concurrency", type=_positive, default=2, help="requests in flight")
    run.add_argument("--extensions", default=DEFAULT_EXTENSIONS, help="comma-separated")
    run.add_argument("--top-k", type=_positive, default=None)
    return parser


def _existing_dir(value: str) -> Path:
    if not Path(value).is_dir():
        raise argparse.ArgumentTypeError(f"not a folder: {value}")
    return Path(value)


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {value}")
    return int(value)


@dataclass
class Tally:
    """What the summary reports; updated by the worker threads (retries) and the main one."""

    retries: Counter[str] = field(default_factory=Counter)
    unsent: Counter[str] = field(default_factory=Counter)  # images of chunks that never got in
    sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def retried(self, code: str) -> None:
        with self.lock:
            self.retries[code] += 1


def classify(args: argparse.Namespace) -> int:
    extensions = {e.strip().lower().lstrip(".") for e in args.extensions.split(",") if e.strip()}
    images = find_images(args.dir, extensions)
    done = read_results(args.out)
    todo = [path for path in images if str(path) not in done]

    tally = Tally()
    stop = threading.Event()
    local = threading.local()  # one client per thread: SyncHTTPClient is not thread-safe

    def client() -> ImageClassifierClient:
        if not hasattr(local, "client"):
            local.client = ImageClassifierClient(args.url, token=args.token)
        return local.client

    def send(chunk: list[Path]) -> BatchResult:
        return with_retries(lambda: client().analyze_batch(chunk, top_k=args.top_k), tally, stop)

    # /info first: the limits that size the chunks, and the reachability and token check.
    limits = with_retries(lambda: client().info().limits, tally, stop)
    too_large, chunks = plan_chunks(todo, limits, args.batch_size)
    started = time.perf_counter()
    with (
        open_for_append(args.out) as out,
        tqdm(total=len(todo), unit="img", file=sys.stderr, disable=None) as progress,
        ThreadPoolExecutor(args.concurrency) as pool,
    ):
        write(out, done, [_too_large(p, limits) for p in too_large], progress)
        futures = {pool.submit(send, chunk): chunk for chunk in chunks}
        try:
            for future in as_completed(futures):
                chunk = futures[future]
                try:
                    result = future.result()
                except (Unreachable, Unauthorized):
                    raise
                except ClassifierClientError as exc:
                    # Not the images' fault (retries ran out, the server failed): not written,
                    # so the next run sends them again.
                    tally.unsent[exc.code] += len(chunk)
                    progress.update(len(chunk))
                    continue
                tally.sent += len(chunk)
                write(out, done, to_records(chunk, result), progress)
        except BaseException:  # Ctrl-C or a fatal error: send no more chunks
            stop.set()
            pool.shutdown(cancel_futures=True)
            raise
    elapsed = time.perf_counter() - started
    if args.csv:
        write_csv(args.csv, read_results(args.out).values())
    return summarise(images, done, len(images) - len(todo), tally, elapsed, args.out)


def find_images(root: Path, extensions: set[str]) -> list[Path]:
    """Every file under root whose extension (any case) is listed, in sorted order."""
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in extensions
    )


def read_results(out: Path) -> dict[str, Record]:
    """The records already in the output file, by path (a torn last line is ignored)."""
    records: dict[str, Record] = {}
    if out.exists():
        for line in out.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            records[record["path"]] = record
    return records


def plan_chunks(
    paths: list[Path], limits: Limits, batch_size: int
) -> tuple[list[Path], list[list[Path]]]:
    """(files too large to send, chunks no request limit can refuse), in path order."""
    most_images = min(batch_size, limits.max_batch_images)
    budget = limits.max_batch_bytes
    largest = min(limits.max_upload_bytes, budget - PART_OVERHEAD_BYTES)
    too_large, chunks, chunk, chunk_bytes = [], [], [], 0
    for path in paths:
        size = path.stat().st_size
        if size > largest:
            too_large.append(path)
            continue
        cost = size + PART_OVERHEAD_BYTES
        if chunk and (len(chunk) == most_images or chunk_bytes + cost > budget):
            chunks.append(chunk)
            chunk, chunk_bytes = [], 0
        chunk.append(path)
        chunk_bytes += cost
    if chunk:
        chunks.append(chunk)
    return too_large, chunks


def with_retries(call: Callable[[], T], tally: Tally, stop: threading.Event) -> T:
    """call(), again on 429 and 503 answers, with exponential backoff honouring Retry-After.

    Waits on `stop` rather than sleeping, so Ctrl-C does not have to wait out the backoffs.
    """
    attempt = 0
    while True:
        try:
            return call()
        except RETRYABLE as exc:
            attempt += 1
            if attempt == MAX_ATTEMPTS:
                raise
            tally.retried(exc.code)
            backoff = BACKOFF_BASE_S * 2 ** (attempt - 1)
            wait = min(max(backoff, exc.retry_after or 0), BACKOFF_MAX_S)
            if stop.wait(wait + random.uniform(0, BACKOFF_BASE_S)):  # jitter spreads chunks out
                raise


def to_records(chunk: list[Path], result: BatchResult) -> Iterator[Record]:
    """One record per image; a per-image error inside a 200 answer is that image's result."""
    for item in result.results:
        path = str(chunk[item.index])
        if item.success:
            yield {
                "path": path,
                "label": item.prediction.label,
                "confidence": item.prediction.confidence,
                "grade": item.prediction.grade,
                "model_version": f"{result.model.name}:{result.model.version}",
            }
        else:
            yield {"path": path, "error": item.error.code, "message": item.error.message}


def _too_large(path: Path, limits: Limits) -> Record:
    limit = min(limits.max_upload_bytes, limits.max_batch_bytes - PART_OVERHEAD_BYTES)
    message = f"the file is over the limit of {limit:,} bytes (not sent)"
    return {"path": str(path), "error": "PAYLOAD_TOO_LARGE", "message": message}


def open_for_append(path: Path) -> TextIO:
    """The output file, opened to append after a complete line (a killed run may leave half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    out = path.open("a", encoding="utf-8")
    if torn:
        out.write("\n")
    return out


def write(out: TextIO, done: dict[str, Record], records, progress: tqdm) -> None:
    """Append records and flush at once, so an interrupted run keeps what it got."""
    count = 0
    for record in records:
        out.write(json.dumps(record) + "\n")
        done[str(record["path"])] = record
        count += 1
    out.flush()
    progress.update(count)


def write_csv(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(records)


def summarise(
    images: list[Path],
    done: dict[str, Record],
    skipped: int,
    tally: Tally,
    elapsed: float,
    out: Path,
) -> int:
    """Print the outcome for every image under DIR (this run's and earlier ones'); exit status."""
    records = [done[str(p)] for p in images if str(p) in done]
    failed = Counter(str(r["error"]) for r in records if "error" in r) + tally.unsent
    ok = sum(1 for r in records if "error" not in r)
    rate = tally.sent / elapsed if elapsed > 0 else 0.0
    print(f"{ok} ok, {sum(failed.values())} failed{_by_code(failed)}")
    print(
        f"sent {tally.sent} images in {elapsed:.1f} s ({rate:.0f} images/s); "
        f"skipped {skipped} already in {out}; "
        f"retries: {sum(tally.retries.values())}{_by_code(tally.retries)}"
    )
    if tally.unsent:
        print(f"not classified (not written, run again to resend):{_by_code(tally.unsent)}")
    return 1 if failed else 0


def _by_code(counts: Counter[str]) -> str:
    return f" ({', '.join(f'{code}: {n}' for code, n in sorted(counts.items()))})" if counts else ""
