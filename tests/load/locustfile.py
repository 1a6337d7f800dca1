"""Load on the gateway: analyses (the expensive path), stored results read back, model cards.

Run by `make loadtest` / `python -m bench.loadtest`, which start a local stack, drive it with
locust headless and judge the result. Every analysis carries a different pixel size, so none
is answered from the results cache. Chat and batch submission join this file when their
endpoints exist (issues 5 and 8).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from locust import HttpUser, between, task

# Set by bench/loadtest.py: the photograph to send, and a tenant's key when keys are on.
IMAGE_PATH = Path(os.environ["LOADTEST_IMAGE"])
IMAGE = IMAGE_PATH.read_bytes()
KEY = os.environ.get("LOADTEST_API_KEY", "")
HEADERS = {"Authorization": f"Bearer {KEY}"} if KEY else {}


class Clinician(HttpUser):
    wait_time = between(0.2, 1.0)

    def on_start(self) -> None:
        self.analysis_ids: list[str] = []

    @task(3)
    def analyse(self) -> None:
        pixel_size = f"{random.uniform(5.0, 8.0):.4f}"  # a new cache key every time
        with self.client.post(
            "/v1/analyses",
            files={"file": (IMAGE_PATH.name, IMAGE)},
            data={"pixel_size_um": pixel_size, "overlays": "combined,lesions"},
            headers=HEADERS,
            name="POST /v1/analyses",
            catch_response=True,
            timeout=120,
        ) as reply:
            if reply.status_code != 200:
                reply.failure(f"{reply.status_code}: {reply.text[:200]}")
                return
            self.analysis_ids.append(reply.json()["id"])

    @task(2)
    def read_back(self) -> None:
        if self.analysis_ids:
            analysis_id = random.choice(self.analysis_ids)
            self.client.get(
                f"/v1/analyses/{analysis_id}", headers=HEADERS, name="GET /v1/analyses/{id}"
            )

    @task(1)
    def model_cards(self) -> None:
        self.client.get("/v1/models", headers=HEADERS, name="GET /v1/models")
