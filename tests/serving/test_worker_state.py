"""What workers of one server tell each other through the metric directory."""

from __future__ import annotations

import os

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
