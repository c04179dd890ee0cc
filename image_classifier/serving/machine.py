"""How many CPUs this process may really use, and the worker and thread counts that follow.

`os.cpu_count()` counts the host's CPUs; a container limited to two by its cgroup quota
(`cpu.max`) or pinned to two by `taskset` (the affinity mask) would then start a worker per host
CPU and thrash. The budget is the tightest of the affinity mask and every cgroup v2 quota on the
way from this process's cgroup up to the root (a quota of 1.5 CPUs counts as 2: the half is real
time to use).
"""

from __future__ import annotations

import math
import os
import platform
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
_X86 = {"x86_64", "amd64", "i386", "i686"}
_VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


@dataclass(frozen=True)
class CpuBudget:
    cpus: int
    reason: str  # what the number came from, for /info and the start log


@dataclass(frozen=True)
class Sizing:
    workers: int
    threads: int  # worker threads per process, each decoding an image and running the model
    model_runs: int  # model runs at once per process
    ort_intra_op_threads: int
    ort_solo_threads: int  # for an image that runs alone: all of the worker's CPUs
    reason: str


def cpu_budget(
    cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")
) -> CpuBudget:
    affinity = len(os.sched_getaffinity(0))
    quota = cgroup_quota(cgroup_root, proc_cgroup)
    if quota is None:
        return CpuBudget(affinity, f"affinity mask: {affinity} CPU(s); no cgroup CPU quota")
    cpus = max(1, min(affinity, math.ceil(quota - 1e-9)))
    return CpuBudget(cpus, f"affinity mask: {affinity} CPU(s); cgroup cpu.max: {quota:g} CPU(s)")


def cgroup_quota(cgroup_root: Path, proc_cgroup: Path) -> float | None:
    """The tightest cgroup v2 `cpu.max` quota (in CPUs) from this process's cgroup to the root."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    relative = next((line[3:] for line in lines if line.startswith("0::")), None)
    if relative is None:  # cgroup v1 only: no unified hierarchy to read
        return None
    folder = cgroup_root / relative.lstrip("/")
    quotas = []
    while True:
        quota = _read_cpu_max(folder / "cpu.max")
        if quota is not None:
            quotas.append(quota)
        if folder == cgroup_root or cgroup_root not in folder.parents:
            break
        folder = folder.parent
    return min(quotas) if quotas else None


def _read_cpu_max(path: Path) -> float | None:
    """`max 100000` (no quota) or `200000 100000` (2 CPUs' worth per period)."""
    try:
        limit, _, period = path.read_text().strip().partition(" ")
    except OSError:
        return None
    if limit == "max" or not limit.isdigit() or not period.isdigit() or int(period) == 0:
        return None
    return int(limit) / int(period)


def size_for(budget: CpuBudget, workers: int = 0) -> Sizing:
    """One worker per CPU, each running as many 1-thread model runs at once as it has CPUs, with
    twice as many threads (so the next images decode, and queue into batches, meanwhile); an image
    that runs alone may take two threads. `workers` > 0: that many workers (set by the operator),
    the CPUs shared among them.

    One process per CPU because one process does not fill two: its event loop and the Python
    parts of decoding and answering take turns on one interpreter lock, so CPUs idle while
    threads wait for it (docs/benchmarks.md: the server CPU and throughput of the `service
    WORKERS=1` point beside the service's). Two 1-thread model runs in parallel beat one 2-thread
    run on a busy machine; a lone image's second thread cuts its latency at low load."""
    workers = workers or budget.cpus
    runs = max(1, budget.cpus // workers)
    threads = 2 * runs
    solo = max(runs, min(2, budget.cpus))
    return Sizing(
        workers, threads, runs, 1, solo, describe_sizing(budget, workers, threads, runs, 1, solo)
    )


def describe_sizing(
    budget: CpuBudget, workers: int, threads: int, runs: int, intra_op: int, solo: int
) -> str:
    """What /info and the start line say of the counts in effect, and the CPUs they came from."""
    return (
        f"{budget.cpus} usable CPU(s) ({budget.reason}): {workers} worker(s), each with "
        f"{threads} threads and {runs} model run(s) at once of {intra_op} ONNX Runtime "
        f"thread(s) ({solo} for an image that runs alone)"
    )


def share_the_interpreter_lock(switch_interval_ms: float) -> None:
    """How long a thread may keep the interpreter lock while another waits for it.

    A worker's event loop shares the lock with the threads that decode and run the model. With
    Python's 5 ms, a loop woken by a finished image or a new request waits up to 5 ms for a
    thread busy in Python code (Pillow's and numpy's Python parts, the batcher), and every answer
    waiting behind it does too. 1 ms cut the 99th percentile at 16 clients in each of 10 paired
    rounds (MobileNetV2, 640x480 JPEG)."""
    sys.setswitchinterval(switch_interval_ms / 1000)


_this_thread = threading.local()


def yield_to_the_event_loop(nice: int) -> None:
    """Schedule the calling thread `nice` steps below the worker's event loop (once per thread;
    Linux only, where nice is a thread's own; raising it needs no privilege).

    On a worker's cores the event loop competes with the threads that decode and run the model,
    and at the same priority a loop woken by a request waited its turn behind them: under 4x
    overload, the loop's refusals took longer and their 90th percentile with it (measured by hand
    with the loop's wait for a CPU from /proc/<pid>/task/<tid>/schedstat). The threads get every
    core the loop does not need, so throughput stays."""
    if nice and sys.platform == "linux" and not getattr(_this_thread, "nice", 0):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        _this_thread.nice = nice


def int8_saturates(cpuinfo: Path = Path("/proc/cpuinfo"), machine: str | None = None) -> bool:
    """True on an x86 CPU without VNNI. There ONNX Runtime's uint8 x int8 kernels add products
    in pairs into 16 bits (VPMADDUBSW) and saturate (its quantization guide says so), so an INT8
    model's answers drift: a MobileNetV2 agreed with its fp32 top-1 on 65% of pictures on such a
    CPU, against over 99% on one with VNNI. 7-bit weights (`reduce_range`) cannot saturate."""
    if (machine or platform.machine()).lower() not in _X86:
        return False
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return False
    flags = next((line.partition(":")[2].split() for line in lines if line.startswith("flags")), [])
    return not _VNNI_FLAGS.intersection(flags)
