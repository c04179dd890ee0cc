"""What workers of one server tell each other through the metric directory: who is still loading."""

from __future__ import annotations

import os
import subprocess
import sys

from image_classifier.serving import worker_state


def test_readiness_waits_for_a_live_worker_still_loading(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert not worker_state.another_worker_is_loading()
    worker_state.loading()  # this worker's own marker does not hold it back
    assert (tmp_path / f"loading_{os.getpid()}").exists()
    assert not worker_state.another_worker_is_loading()

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f"loading_{other.pid}").touch()
        assert worker_state.another_worker_is_loading()
    finally:
        other.kill()
        other.wait()
    assert not worker_state.another_worker_is_loading()  # one that died loading holds none back

    worker_state.loading(done=True)
    assert not (tmp_path / f"loading_{os.getpid()}").exists()


def test_without_a_metric_directory_no_worker_waits(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    worker_state.loading()
    assert not worker_state.another_worker_is_loading()
