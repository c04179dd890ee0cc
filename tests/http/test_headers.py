"""Request ids: the client's when safe, else a fresh UUID4 that no other worker draws too."""

from __future__ import annotations

import subprocess
import sys
import uuid

from image_classifier.http.headers import new_request_id, request_id_for


def test_a_safe_client_id_is_kept_and_an_unsafe_one_replaced():
    assert request_id_for("order-17.a_B") == "order-17.a_B"
    for unsafe in (None, "", "a b", "x" * 129, "id\r\nx-admin: 1"):
        assert uuid.UUID(request_id_for(unsafe)).version == 4


def test_new_ids_are_uuid4_and_differ_within_and_across_processes():
    ids = [new_request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(uuid.UUID(i).version == 4 and str(uuid.UUID(i)) == i for i in ids[:100])
    draw = "from image_classifier.http.headers import new_request_id; print(new_request_id())"
    first, second = (
        subprocess.run(
            [sys.executable, "-c", draw], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    )
    assert first != second and first not in ids  # each worker process seeds its own generator
