"""Load on the gateway: analyses (the expensive path), stored results read back, model cards,
batches carried to completion by the worker, and grounded chat answers.

Run by `make loadtest` / `python -m bench.loadtest`, which start a local stack, drive it with
locust headless and judge the result. Every analysis and every batch carries a different pixel
size, so none is answered from the results cache. Each user runs the same cycle of tasks
(`Visit`), so that even the 40 s form exercises every endpoint.
"""

from __future__ import annotations

import io
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from locust import HttpUser, SequentialTaskSet, between
from PIL import Image, ImageOps

# Set by bench/loadtest.py: the photograph to send, and a tenant's key when keys are on.
IMAGE_PATH = Path(os.environ["LOADTEST_IMAGE"])
IMAGE = IMAGE_PATH.read_bytes()
KEY = os.environ.get("LOADTEST_API_KEY", "")
HEADERS = {"Authorization": f"Bearer {KEY}"} if KEY else {}
BATCH_DEADLINE_S = 180.0
BATCH_POLL_S = 1.0
FINISHED = {"completed", "completed_with_errors", "cancelled"}
# Reported as a request of its own: submission to the last image finished, as a client sees it.
BATCH_TURNAROUND = "batch turnaround"
CHAT_MAX_TOKENS = 16


def _mirrored_png(data: bytes) -> bytes:
    """The photograph flipped left-right: another image (content hash) of the same size."""
    buffer = io.BytesIO()
    ImageOps.mirror(Image.open(io.BytesIO(data)).convert("RGB")).save(buffer, format="PNG")
    return buffer.getvalue()


BATCH_FILES = [
    ("files", (IMAGE_PATH.name, IMAGE)),
    ("files", (f"{IMAGE_PATH.stem}-mirrored.png", _mirrored_png(IMAGE))),
]


def _pixel_size() -> str:
    return f"{random.uniform(5.0, 8.0):.4f}"  # a new cache key every time


class Visit(SequentialTaskSet):
    """One clinician's cycle: analyse, batch, read back, list models, ask, analyse, read back,
    analyse (three analyses, two reads, one each of the rest; the cheap ones early)."""

    def on_start(self) -> None:
        self.analysis_ids: list[str] = []

    def post(self, path: str, expected: int, timeout: float, **body: Any) -> dict | None:
        """POST, counted under its path; the JSON answer, or None (a failure) when its status
        is not `expected`."""
        with self.client.post(
            path,
            headers=HEADERS,
            name=f"POST {path}",
            catch_response=True,
            timeout=timeout,
            **body,
        ) as reply:
            if reply.status_code != expected:
                reply.failure(f"{reply.status_code}: {reply.text[:200]}")
                return None
            return reply.json()

    def analyse(self) -> None:
        created = self.post(
            "/v1/analyses",
            200,
            120,
            files={"file": (IMAGE_PATH.name, IMAGE)},
            data={"pixel_size_um": _pixel_size(), "overlays": "combined,lesions"},
        )
        if created is not None:
            self.analysis_ids.append(created["id"])

    def read_back(self) -> None:
        if self.analysis_ids:
            analysis_id = random.choice(self.analysis_ids)
            self.client.get(
                f"/v1/analyses/{analysis_id}", headers=HEADERS, name="GET /v1/analyses/{id}"
            )

    def model_cards(self) -> None:
        self.client.get("/v1/models", headers=HEADERS, name="GET /v1/models")

    def batch(self) -> None:
        """Submit two images, then poll the batch until the worker has finished both."""
        started = time.perf_counter()
        submitted = self.post(
            "/v1/batches", 202, 60, files=BATCH_FILES, data={"pixel_size_um": _pixel_size()}
        )
        if submitted is None:
            return
        batch_id = submitted["id"]
        status: dict[str, Any] = {}
        while time.perf_counter() - started < BATCH_DEADLINE_S:
            time.sleep(BATCH_POLL_S)
            with self.client.get(
                f"/v1/batches/{batch_id}",
                headers=HEADERS,
                name="GET /v1/batches/{id}",
                catch_response=True,
            ) as poll:
                if poll.status_code != 200:
                    poll.failure(f"{poll.status_code}: {poll.text[:200]}")
                    return
                status = poll.json()
            if status["state"] in FINISHED:
                break
        problem = None
        if status.get("state") != "completed":
            outcome = f"{status.get('state')}, errors {status.get('errors')}"
            problem = RuntimeError(f"batch {batch_id}: {outcome}")
        self.user.environment.events.request.fire(
            request_type="BATCH",
            name=BATCH_TURNAROUND,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=0,
            exception=problem,
            context={},
        )

    def chat(self) -> None:
        if not self.analysis_ids:
            return
        question = {"role": "user", "content": "What is the cup-to-disc ratio?"}
        self.post(
            "/v1/chat",
            200,
            120,
            json={
                "analysis_id": random.choice(self.analysis_ids),
                "messages": [question],
                "max_tokens": CHAT_MAX_TOKENS,
            },
        )

    tasks: ClassVar[list[Callable[[Visit], None]]] = [
        analyse, batch, read_back, model_cards, chat, analyse, read_back, analyse,
    ]  # fmt: skip


class Clinician(HttpUser):
    wait_time = between(0.2, 1.0)
    tasks: ClassVar[list[type[SequentialTaskSet]]] = [Visit]
