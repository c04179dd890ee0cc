"""Mixed load on a running service: single images (weight 3) and batches (weight 1).

    locust -f loadtest/locustfile.py --headless -u 16 -r 4 -t 30s --host http://127.0.0.1:3000

Posts real pictures (held-out digits, PNG and JPEG) to the real field names, and counts a
response as failed unless it is a 200 with `success: true` (a batch: every item succeeded).
"""

from __future__ import annotations

import io
import random

from locust import HttpUser, between, task

from training_export.digits import render_heldout


def _encoded_pictures() -> list[tuple[str, bytes, str]]:
    pictures = []
    for index, (image, _label) in enumerate(render_heldout()[:100]):
        png, jpeg = io.BytesIO(), io.BytesIO()
        image.save(png, format="PNG")
        image.convert("RGB").save(jpeg, format="JPEG", quality=85)
        pictures.append((f"digit{index}.png", png.getvalue(), "image/png"))
        pictures.append((f"digit{index}.jpg", jpeg.getvalue(), "image/jpeg"))
    return pictures


PICTURES = _encoded_pictures()


class ClassifierUser(HttpUser):
    wait_time = between(0.0, 0.05)

    @task(3)
    def analyze(self) -> None:
        with self.client.post(
            "/analyze", files={"image": random.choice(PICTURES)}, catch_response=True
        ) as response:
            if response.status_code != 200 or not response.json().get("success"):
                response.failure(f"{response.status_code}: {response.text[:200]}")

    @task(1)
    def analyze_batch(self) -> None:
        files = [("images", picture) for picture in random.sample(PICTURES, 8)]
        with self.client.post("/analyze_batch", files=files, catch_response=True) as response:
            results = response.json().get("results", []) if response.status_code == 200 else []
            if len(results) != 8 or not all(item["success"] for item in results):
                response.failure(f"{response.status_code}: {response.text[:200]}")
