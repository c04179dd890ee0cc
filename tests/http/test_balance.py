"""The connection balance between workers, with another worker's count faked in the directory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from image_classifier.http.balance import LOOK_EVERY_S, ConnectionBalance


@pytest.fixture
def other_worker(tmp_path, monkeypatch):
    """A live process standing for the other worker; write its count to the returned file."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield tmp_path / f"connections_{other.pid}"
    other.kill()
    other.wait()


def test_a_worker_over_its_share_closes_one_connection_per_look(other_worker):
    now = [100.0]
    balance = ConnectionBalance(workers=2, clock=lambda: now[0])
    other_worker.write_text("5")
    for _ in range(11):
        balance.opened()
    assert (other_worker.parent / f"connections_{os.getpid()}").read_text().strip() == "11"
    assert balance.close_after_this_request()  # 11 of 16: the share is 8
    assert not balance.close_after_this_request()  # one per look, not a stampede
    now[0] += LOOK_EVERY_S
    for _ in range(3):
        balance.closed()
    other_worker.write_text("8")
    assert not balance.close_after_this_request()  # 8 and 8


def test_a_dead_worker_count_is_ignored_and_one_worker_never_closes(other_worker):
    now = [100.0]
    balance = ConnectionBalance(workers=2, clock=lambda: now[0])
    (other_worker.parent / "connections_999999999").write_text("40")  # no such process
    other_worker.write_text("6")
    for _ in range(6):
        balance.opened()
    assert not balance.close_after_this_request()
    alone = ConnectionBalance(workers=1, clock=lambda: now[0])
    alone.opened()
    assert not alone.close_after_this_request()
