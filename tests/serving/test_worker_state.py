"""What workers of one server tell each other through the metric directory."""

from __future__ import annotations

import os
import subprocess
import sys

from image_classifier.serving import worker_state


def test_readiness_waits_until_every_worker_has_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert not worker_state.every_worker_loaded(2)
    worker_state.loaded()
    assert (tmp_path / f"loaded_{os.getpid()}").exists()
    assert not worker_state.every_worker_loaded(2)  # the other is still loading
    assert worker_state.every_worker_loaded(1)
    (tmp_path / "loaded_999999999").touch()  # a worker that loaded, then died: it counts
    assert worker_state.every_worker_loaded(2)


def test_without_a_metric_directory_no_worker_waits(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    worker_state.loaded()
    assert worker_state.every_worker_loaded(4)


def test_an_image_is_alone_only_when_no_worker_has_another_in_work(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    first, second = worker_state.InWork(slot=1), worker_state.InWork(slot=2)
    assert not first.alone()  # nothing in work: there is no image to be alone
    first.change(1)
    assert first.alone()
    first.change(1)
    assert not first.alone()  # another image of its own
    first.change(-1)
    second.change(1)
    assert not first.alone() and not second.alone()  # one each: both CPUs are taken
    # The other worker is another process: it sees the same page.
    probe = (
        "from image_classifier.serving.worker_state import InWork; "
        "w = InWork(slot=3); w.change(1); print(w.alone())"
    )
    other = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           env={**os.environ}, check=True)  # fmt: skip
    assert other.stdout.strip() == "False"  # it saw first's and second's images
    second.change(-1)
    assert not first.alone()  # slot 3's process exited with its image counted: it stays busy
    worker_state.InWork(slot=3)  # until a replacement takes the slot and clears it
    assert first.alone()


def test_without_a_metric_directory_a_worker_judges_by_its_own_images(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    alone = worker_state.InWork()
    alone.change(1)
    assert alone.alone()
