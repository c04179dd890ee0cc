"""Process and thread counts from the CPUs this process may use: cgroup quota and affinity mask."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from image_classifier.serving.machine import (
    CpuBudget,
    cgroup_quota,
    cpu_budget,
    int8_saturates,
    size_for,
    yield_to_the_event_loop,
)
from image_classifier.serving.settings import Settings


def fake_cgroup(tmp_path: Path, quotas: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup v2 tree with `cpu.max` files, and a /proc/self/cgroup naming its leaf."""
    root = tmp_path / "cgroup"
    for folder, cpu_max in quotas.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "cpu.max").write_text(cpu_max + "\n")
    leaf = max(quotas, key=len)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"0::/{leaf}\n")
    return root, proc


def test_no_quota_means_the_affinity_mask(tmp_path):
    root, proc = fake_cgroup(tmp_path, {"kubepods/pod1": "max 100000"})
    budget = cpu_budget(root, proc)
    assert budget.cpus == len(os.sched_getaffinity(0))
    assert "no cgroup CPU quota" in budget.reason


def test_the_tightest_quota_on_the_way_to_the_root_counts(tmp_path):
    root, proc = fake_cgroup(
        tmp_path, {"kubepods": "300000 100000", "kubepods/pod1": "150000 100000"}
    )
    assert cgroup_quota(root, proc) == 1.5
    budget = cpu_budget(root, proc)
    assert budget.cpus == min(2, len(os.sched_getaffinity(0)))  # 1.5 CPUs: two to schedule on
    assert "cgroup cpu.max: 1.5 CPU(s)" in budget.reason


def test_cgroup_v1_or_unreadable_files_mean_no_quota(tmp_path):
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("4:cpu,cpuacct:/docker/abc\n")
    assert cgroup_quota(tmp_path, proc) is None
    assert cgroup_quota(tmp_path, tmp_path / "missing") is None


@pytest.mark.parametrize(
    ("cpus", "workers", "threads", "runs"),
    [(1, 1, 2, 1), (2, 2, 2, 1), (3, 3, 2, 1), (16, 16, 2, 1)],
)
def test_sizing_per_cpu_count(cpus, workers, threads, runs):
    """A worker per CPU: one interpreter lock per CPU; a lone image may take two threads."""
    sizing = size_for(CpuBudget(cpus, "test"))
    assert (sizing.workers, sizing.threads, sizing.model_runs) == (workers, threads, runs)
    assert sizing.ort_solo_threads == min(2, cpus)
    assert sizing.ort_intra_op_threads == 1 and f"{cpus} usable CPU(s)" in sizing.reason


@pytest.mark.parametrize(
    ("cpus", "workers", "threads", "runs"), [(2, 1, 4, 2), (16, 4, 8, 4), (2, 4, 2, 1)]
)
def test_workers_set_by_the_operator_share_the_cpus(cpus, workers, threads, runs):
    """WORKERS=1 on 2 CPUs: two model runs in the one worker, not the one each of two gets."""
    sizing = size_for(CpuBudget(cpus, "test"), workers=workers)
    assert (sizing.workers, sizing.threads, sizing.model_runs) == (workers, threads, runs)
    assert sizing.ort_solo_threads == max(runs, 2)


def test_given_values_win_and_are_named():
    settings = Settings.from_env({"WORKERS": "3", "ORT_INTRA_OP_THREADS": "2"})
    assert (settings.workers, settings.ort_intra_op_threads) == (3, 2)
    assert settings.threads >= 1 and settings.model_runs >= 1
    assert "set in the environment: WORKERS=3, ORT_INTRA_OP_THREADS=2" in settings.sizing
    # The sentence says the counts in effect (it said those the CPUs alone would give).
    assert "3 worker(s)" in settings.sizing and "of 2 ONNX Runtime thread(s)" in settings.sizing


def test_counts_over_the_cpus_are_named():
    """WORKERS=64 on a small machine is allowed (an operator may mean it) but said, in /info and
    as a warning at start: the processes take turns, and each holds a copy of the model."""
    budget = CpuBudget(2, "test")
    assert Settings.from_env({}).sized(budget).over_the_cpus == ""
    assert Settings.from_env({"WORKERS": "1"}).sized(budget).over_the_cpus == ""  # 2 runs
    many = Settings.from_env({"WORKERS": "64"}).sized(budget)
    assert many.over_the_cpus.startswith("64 worker(s) x 1 model run(s) x 1 ONNX Runtime")
    assert "= 64 model threads at once on 2 usable CPU(s)" in many.over_the_cpus
    assert many.sizing.endswith(f"; over the CPUs: {many.over_the_cpus}")
    wide = Settings.from_env({"ORT_INTRA_OP_THREADS": "2"}).sized(budget)
    assert "= 4 model threads at once on 2 usable CPU(s)" in wide.over_the_cpus


@pytest.mark.parametrize(("mask", "expected"), [("0", (1, 2, 1)), ("0,1", (2, 2, 1))])
def test_taskset_limits_what_is_chosen(mask, expected):
    code = (
        "import json; from image_classifier.serving.settings import Settings; "
        "s = Settings.from_env({}); "
        "print(json.dumps([s.workers, s.threads, s.model_runs, s.sizing]))"
    )
    out = subprocess.run(
        ["taskset", "-c", mask, sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    *counts, reason = json.loads(out)
    assert tuple(counts) == expected
    assert f"affinity mask: {len(mask.split(','))} CPU(s)" in reason


@pytest.mark.parametrize(
    ("flags", "machine", "saturates"),
    [
        ("fpu sse2 avx avx2 fma", "x86_64", True),  # AVX2 only: VPMADDUBSW saturates
        ("fpu avx2 avx512f avx512_vnni", "x86_64", False),
        ("fpu avx2 avx_vnni", "x86_64", False),
        ("fp asimd asimddp", "aarch64", False),  # ARM's dot products do not saturate
    ],
)
def test_int8_saturation_is_read_from_the_cpu_flags(tmp_path, flags, machine, saturates):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: some CPU\nflags\t\t: {flags}\n\n")
    assert int8_saturates(cpuinfo, machine) is saturates
    assert int8_saturates(tmp_path / "absent", machine) is False  # unknown: no claim


def test_a_thread_that_decodes_runs_below_the_event_loop_once_set():
    def nice_of_a_worker_thread() -> int:
        yield_to_the_event_loop(5)
        yield_to_the_event_loop(5)  # once per thread: not 10 steps
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    loop_thread = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(nice_of_a_worker_thread).result() == min(19, loop_thread + 5)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == loop_thread
