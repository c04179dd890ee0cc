"""`python -m client classify DIR --out results.jsonl`: classify a folder tree, resumably.

Images go through /analyze_batch in chunks sized from the server's /info limits, a few chunks at
once. Each image gets one JSON line in the output, written as soon as its chunk comes back, so an
interrupted run loses nothing: the next run skips every path already in the file.

Exit status: 0 every image classified, 1 some failed (or could not be read, timed out, or were
not sent: run again to resend those), 2 usage error, wrong URL or server unreachable, 130/143
interrupted.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import signal
import stat
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

from .errors import RETRYABLE, ClassifierClientError, TimedOut, Unauthorized, Unreachable
from .typed import DEFAULT_TIMEOUT_S, DEFAULT_URL, BatchResult, ImageClassifierClient, Limits

DEFAULT_EXTENSIONS = "jpg,jpeg,jpe,jfif,png,apng,webp,gif,bmp,tif,tiff,heic,heif,avif"
COLUMNS = ["path", "label", "confidence", "grade", "model_version", "top_k", "error", "message"]
TOKEN_VARIABLE = "IMAGE_CLASSIFIER_TOKEN"  # read when --token is not given (not shown by ps)
UNREADABLE = "UNREADABLE"  # a file or folder this machine could not read: tried again next run
TIMEOUT = "TIMEOUT"  # a chunk with no answer within --timeout: its images are tried again next run
SENT_AGAIN = {UNREADABLE, TIMEOUT}
MAX_ATTEMPTS = 8  # per chunk, for 429 and 503 answers
MAX_TIMEOUT_ATTEMPTS = 2  # per chunk, for no answer in time: each one waits out all of --timeout
BACKOFF_BASE_S = 0.5  # attempt n waits at least BACKOFF_BASE_S * 2**n, and Retry-After if longer
BACKOFF_MAX_S = 30.0
# Room for each file's multipart headers (boundary, Content-Disposition with the file name,
# Content-Type), so a chunk's body stays under max_batch_bytes.
PART_OVERHEAD_BYTES = 1024

Record = dict[str, object]
T = TypeVar("T")


class UsageError(Exception):
    """Something about the command line or its files, found before any image is sent."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupted)  # as Ctrl-C: say where the results are
    try:
        return classify(args)
    except (ClassifierClientError, UsageError) as exc:  # unreachable, token refused, bad files
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (`_interrupted`)
        where = f"what came back is in {args.out}" if args.out.exists() else "nothing came back"
        print(f"interrupted: {where}; run again to resume", file=sys.stderr)
        return 128 + getattr(stop, "signal", signal.SIGINT)


def _interrupted(signum: int, _frame: object) -> None:
    stop = KeyboardInterrupt()
    stop.signal = signum
    raise stop


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "classify",
        help="classify every image under a folder",
        description=__doc__,
        epilog=f"Each image gets one JSON line in --out ({', '.join(COLUMNS)}; top_k with "
        "--top-k): a label, or an error code and message. A second run with the same --out "
        "sends only the images not in it yet (and those that could not be read).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run.add_argument("dir", type=_existing_dir, help="folder to walk (recursively)")
    run.add_argument("--out", type=Path, required=True, help="JSON Lines results (appended)")
    run.add_argument("--csv", type=Path, help="also write all results as CSV")
    run.add_argument("--url", default=DEFAULT_URL, help="the service")
    run.add_argument(
        "--token",
        default=os.environ.get(TOKEN_VARIABLE),
        help=f"API token, when the server sets API_TOKENS (better: set ${TOKEN_VARIABLE}, which "
        "other users of this machine cannot read from the process list)",
    )
    run.add_argument("--batch-size", type=_positive, default=16, help="images per request")
    run.add_argument("--concurrency", type=_positive, default=2, help="requests in flight")
    run.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT_S,
        help="seconds to wait for an answer (longer than the server's REQUEST_TIMEOUT_S)",
    )
    run.add_argument("--extensions", default=DEFAULT_EXTENSIONS, help="comma-separated")
    run.add_argument(
        "--top-k", type=_positive, default=None, help="also record the k best labels (top_k)"
    )
    return parser


def _existing_dir(value: str) -> Path:
    if not Path(value).is_dir():
        raise argparse.ArgumentTypeError(f"not a folder: {value}")
    return Path(value)


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {value}")
    return int(value)


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {value}")
    return seconds


@dataclass
class Tally:
    """What the summary reports; updated by the worker threads (retries) and the main one."""

    retries: Counter[str] = field(default_factory=Counter)
    unsent: Counter[str] = field(default_factory=Counter)  # images of chunks that never got in
    unsent_keys: set[str] = field(default_factory=set)  # their paths (`_key`)
    unreadable: int = 0  # folders, broken links and FIFOs found on the walk (no image record)
    sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def retried(self, code: str) -> None:
        with self.lock:
            self.retries[code] += 1


@dataclass
class Sent:
    """One chunk's outcome: its records (answers, and files that could not be read), and the
    paths it sent, with the error when the request itself failed (then they are not written)."""

    records: list[Record]
    paths: list[Path]
    error: ClassifierClientError | None = None


def classify(args: argparse.Namespace) -> int:
    check_outputs(args.out, args.csv)
    extensions = {e.strip().lower().lstrip(".") for e in args.extensions.split(",") if e.strip()}
    # Records name their files by absolute path: a results file read from another folder (a
    # resume from another shell, a cron job) still names them, and matches them.
    images, walk_problems = find_images(Path(_key(args.dir)), extensions)
    done = read_results(args.out)
    todo = [path for path in images if _to_send(done.get(_key(path)))]

    tally = Tally(unreadable=len(walk_problems))
    stop = threading.Event()
    local = threading.local()  # one client per thread: SyncHTTPClient is not thread-safe

    def client() -> ImageClassifierClient:
        if not hasattr(local, "client"):
            local.client = ImageClassifierClient(args.url, token=args.token, timeout=args.timeout)
        return local.client

    def send(chunk: list[Path]) -> Sent:
        """Read in this thread, sent as bytes: a file that cannot be read (or is gone by now)
        fails alone, and no file name has to survive the upload's encoding."""
        readable, records = read_files(chunk)
        if not readable:
            return Sent(records, [])
        paths, contents = [path for path, _ in readable], [data for _, data in readable]
        try:
            result = with_retries(
                lambda: client().analyze_batch(contents, top_k=args.top_k), tally, stop
            )
        except (Unreachable, Unauthorized):
            raise
        except TimedOut as exc:  # this chunk only: recorded, so that the next run sends it again
            message = f"{exc.message}, {MAX_TIMEOUT_ATTEMPTS} times (sent again next run)"
            return Sent(records + [_failure(path, TIMEOUT, message) for path in paths], paths)
        except ClassifierClientError as exc:  # not the images' fault: sent again next run
            return Sent(records, paths, exc)
        return Sent(records + list(to_records(paths, result, args.top_k)), paths)

    # /info first: the limits that size the chunks, and the reachability and token check.
    info = with_retries(lambda: client().info(), tally, stop)
    if args.top_k is not None and args.top_k > len(info.labels):
        raise UsageError(f"--top-k {args.top_k}: the model has {len(info.labels)} labels")
    too_large, chunks = plan_chunks(todo, info.limits, args.batch_size)
    started = time.perf_counter()
    with (
        open_for_append(args.out) as out,
        tqdm(total=len(todo), unit="img", file=sys.stderr, disable=None) as progress,
        ThreadPoolExecutor(args.concurrency) as pool,
    ):
        # Not images: not on the progress bar; recorded once, not again by every later run.
        write(out, done, [r for r in walk_problems if done.get(_key(str(r["path"]))) != r])
        write(out, done, [_too_large(p, info.limits) for p in too_large], progress)
        futures = [pool.submit(send, chunk) for chunk in chunks]
        try:
            for future in as_completed(futures):
                sent = future.result()
                write(out, done, sent.records, progress)
                if sent.error is not None:
                    tally.unsent[sent.error.code] += len(sent.paths)
                    tally.unsent_keys.update(map(_key, sent.paths))
                    progress.update(len(sent.paths))
                else:
                    tally.sent += len(sent.paths)
        except BaseException:  # Ctrl-C or a fatal error: send no more chunks
            stop.set()
            pool.shutdown(cancel_futures=True)
            raise
    elapsed = time.perf_counter() - started
    if args.csv:
        write_csv(args.csv, read_results(args.out).values())
    return summarise(images, done, len(images) - len(todo), tally, elapsed, args.out)


def check_outputs(out: Path | None, csv_path: Path | None) -> None:
    """Refused before any image is sent: a folder, one file named for both (the CSV replaced the
    results), or a path under a file (a traceback once the images had been classified)."""
    if out and csv_path and _key(out) == _key(csv_path):
        raise UsageError(f"--csv {csv_path} is the --out file too; give it another name")
    for path in filter(None, (out, csv_path)):
        if path.is_dir():
            raise UsageError(f"{path} is a folder; give a file name")
        existing = next(folder for folder in Path(_key(path)).parents if folder.exists())
        if not existing.is_dir():
            raise UsageError(f"{path}: {existing} is a file, so no file can be made under it")


def _key(path: Path | str) -> str:
    """A path as the resume check compares it: absolute, so `photos/a.png` and
    `/home/me/photos/a.png` are one file (links are not resolved: two links, two images)."""
    return os.path.abspath(path)


def _to_send(record: Record | None) -> bool:
    return record is None or record.get("error") in SENT_AGAIN


def find_images(root: Path, extensions: set[str]) -> tuple[list[Path], list[Record]]:
    """Every file under root whose extension (any case) is listed, in sorted order, through
    linked folders too; and a record for each folder that could not be listed and each file so
    named that is not one (a link to nothing, a FIFO...): not skipped silently, since their
    images would be missing from the results."""
    images: list[Path] = []
    problems: list[Record] = []
    walked: set[str] = set()  # real paths: a link back up the tree must not loop

    def unlisted(error: OSError) -> None:
        problems.append(_unreadable(Path(error.filename or root), f"folder not read: {error}"))

    for folder, folders, names in os.walk(root, onerror=unlisted, followlinks=True):
        real = os.path.realpath(folder)
        if real in walked:  # a loop, or a second link to one folder: its files once only
            folders.clear()
            continue
        walked.add(real)
        folders.sort()  # the same path wins every run when two lead to one folder
        for name in names:
            path = Path(folder, name)
            if path.suffix.lower().lstrip(".") not in extensions:
                continue
            problem = _not_a_file(path)
            if problem is None:
                images.append(path)
            else:
                problems.append(problem)
    return sorted(images), problems


SPECIAL_FILES = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}


def _not_a_file(path: Path) -> Record | None:
    """None for a regular file (through links), else the record that says why it is not sent.
    Only stat: opening a FIFO would block until something writes to it."""
    try:
        mode = path.stat().st_mode
    except OSError as error:
        if isinstance(error, FileNotFoundError) and path.is_symlink():
            return _unreadable(path, "a link to nothing")
        return _unreadable(path, f"not read: {error.strerror or error}")
    if stat.S_ISREG(mode):
        return None
    kind = SPECIAL_FILES.get(stat.S_IFMT(mode), "a device")
    return _unreadable(path, f"not a regular file but {kind} (not sent)")


def read_files(paths: list[Path]) -> tuple[list[tuple[Path, bytes]], list[Record]]:
    """(path, bytes) of each file that could be read, and an UNREADABLE record for the rest."""
    readable, problems = [], []
    for path in paths:
        try:
            readable.append((path, path.read_bytes()))
        except OSError as error:
            problems.append(_unreadable(path, f"not read: {error.strerror or error}"))
    return readable, problems


def _unreadable(path: Path, message: str) -> Record:
    return _failure(path, UNREADABLE, message)


def _failure(path: Path | str, code: str, message: str) -> Record:
    return {"path": str(path), "error": code, "message": message}


def _whole_lines(data: bytes) -> bytes:
    """data up to the end of its last whole line: what follows was torn by a killed run."""
    return data[: data.rfind(b"\n") + 1]


def read_results(out: Path) -> dict[str, Record]:
    """The records already in the output file, by `_key` of their path (a torn last line is
    ignored: `open_for_append` cuts it off); UsageError for a file that is not this command's
    output."""
    records: dict[str, Record] = {}
    if not out.exists():
        return records
    lines = _whole_lines(out.read_bytes()).decode("utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("path"), str):
            raise UsageError(f"{out} line {number} is not a result of this command")
        records[_key(record["path"])] = record
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
        try:
            size = path.stat().st_size
        except OSError:  # gone since the walk: its chunk's read records it UNREADABLE (a crash)
            size = 0
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
    """call(), again on 429 and 503 answers and on no answer in time, with exponential backoff
    honouring Retry-After.

    Waits on `stop` rather than sleeping, so Ctrl-C does not have to wait out the backoffs.
    """
    failures: Counter[bool] = Counter()  # by "was it a timeout": each kind has its own limit
    attempt = 0
    while True:
        try:
            return call()
        except (*RETRYABLE, TimedOut) as exc:
            timed_out = isinstance(exc, TimedOut)
            failures[timed_out] += 1
            attempt += 1
            # >=, per kind: one shared count stepped past either limit when the kinds mixed
            # (two 503s, then timeouts), and a chunk was sent again for ever.
            if failures[timed_out] >= (MAX_TIMEOUT_ATTEMPTS if timed_out else MAX_ATTEMPTS):
                raise
            tally.retried(exc.code)
            backoff = BACKOFF_BASE_S * 2 ** (attempt - 1)
            wait = min(max(backoff, exc.retry_after or 0), BACKOFF_MAX_S)
            if stop.wait(wait + random.uniform(0, BACKOFF_BASE_S)):  # jitter spreads chunks out
                raise


def to_records(
    chunk: list[Path], result: BatchResult, top_k: int | None = None
) -> Iterator[Record]:
    """One record per image; a per-image error inside a 200 answer is that image's result."""
    for item in result.results:
        path = str(chunk[item.index])
        if item.success:
            record: Record = {
                "path": path,
                "label": item.prediction.label,
                "confidence": item.prediction.confidence,
                "grade": item.prediction.grade,
                "model_version": f"{result.model.name}:{result.model.version}",
            }
            if top_k is not None:
                record["top_k"] = [[c.label, c.probability] for c in item.prediction.top_k]
            yield record
        else:
            yield _failure(path, item.error.code, item.error.message)


def _too_large(path: Path, limits: Limits) -> Record:
    limit = min(limits.max_upload_bytes, limits.max_batch_bytes - PART_OVERHEAD_BYTES)
    message = f"the file is over the limit of {limit:,} bytes (not sent)"
    return _failure(path, "PAYLOAD_TOO_LARGE", message)


def open_for_append(path: Path) -> TextIO:
    """The output file, opened to append after its last whole line: half a line left by a killed
    run is cut off (its image is sent again), as ending it would make it a broken record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = path.open("a", encoding="utf-8")
    if out.tell():  # O_APPEND: at the end of what is there
        out.truncate(len(_whole_lines(path.read_bytes())))
    return out


def write(out: TextIO, done: dict[str, Record], records, progress: tqdm | None = None) -> None:
    """Append records and flush at once, so an interrupted run keeps what it got."""
    count = 0
    for record in records:
        out.write(json.dumps(record) + "\n")
        done[_key(str(record["path"]))] = record
        count += 1
    out.flush()
    if progress is not None:
        progress.update(count)


def write_csv(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # surrogateescape: a file name that is not UTF-8 is written back as the bytes it was.
    with path.open("w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for record in records:
            best = record.get("top_k")
            if isinstance(best, list):  # JSON, as in the output file: labels may hold any
                # character (spaces, ":"), and a probability keeps every digit
                record = {**record, "top_k": json.dumps(best, ensure_ascii=False)}
            writer.writerow(record)


def summarise(
    images: list[Path],
    done: dict[str, Record],
    skipped: int,
    tally: Tally,
    elapsed: float,
    out: Path,
) -> int:
    """Print the outcome for every image under DIR (this run's and earlier ones'); exit status.
    An image with no record that was not counted unsent is MISSING: the exit says so too."""
    # An image resent and not let in this run is counted by that, not by its earlier record too.
    keys = [key for key in map(_key, images) if key not in tally.unsent_keys]
    records = [done[key] for key in keys if key in done]
    failed = Counter(str(r["error"]) for r in records if "error" in r) + tally.unsent
    failed[UNREADABLE] += tally.unreadable
    failed["MISSING"] += len(images) - len(records) - sum(tally.unsent.values())
    failed = +failed  # the codes that count
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
