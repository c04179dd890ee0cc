"""The connection balance between workers, with another worker's count in the shared page."""

from __future__ import annotations

import pytest

from image_classifier.http.balance import LOOK_EVERY_S, ConnectionBalance
from image_classifier.serving.worker_state import SharedCount


@pytest.fixture
def other_worker(tmp_path, monkeypatch) -> SharedCount:
    """The other worker's connection count (slot 2; the balance under test has slot 1)."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    return SharedCount("connections", slot=2)


def test_a_worker_over_its_share_closes_one_connection_per_look(other_worker):
    now = [100.0]
    balance = ConnectionBalance(workers=2, slot=1, clock=lambda: now[0])
    other_worker.change(5)
    for _ in range(11):
        balance.opened()
    assert balance.count.total() == 16
    assert balance.close_after_this_request()  # 11 of 16: the share is 8
    assert not balance.close_after_this_request()  # one per look, not a stampede
    now[0] += LOOK_EVERY_S
    for _ in range(3):
        balance.closed()
    other_worker.change(3)
    assert not balance.close_after_this_request()  # 8 and 8


def test_a_replacement_clears_a_dead_worker_count_and_one_worker_never_closes(other_worker):
    now = [100.0]
    other_worker.change(40)  # then that worker dies, and its replacement takes its slot
    SharedCount("connections", slot=2)
    balance = ConnectionBalance(workers=2, slot=1, clock=lambda: now[0])
    for _ in range(6):
        balance.opened()
    assert balance.close_after_this_request()  # 6 of 6: over the share of 3
    alone = ConnectionBalance(workers=1, clock=lambda: now[0])
    alone.opened()
    assert not alone.close_after_this_request()
