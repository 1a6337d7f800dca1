"""Faults with real processes: a worker killed mid-batch, the broker restarted mid-batch.

Each batch must end with every image done or failed with a reason, and each image analysed
into exactly one stored row. Small images (rejected by the quality model, so the backends
answer in about 0.3 s) keep each test near half a minute.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from tests.batching import BatchStack
from tests.conftest import fundus_png, wait_until
from tests.reliability import record

pytestmark = pytest.mark.slow

IMAGES = 32


@pytest.fixture
def batches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatchStack]:
    running = BatchStack(tmp_path_factory.mktemp("faults"))
    try:
        running.start()
        yield running
    finally:
        running.stop()


def _submit(batches: BatchStack) -> str:
    # Distinct sizes: distinct content, so every image is its own analysis.
    return batches.submit([(f"eye-{i}.png", fundus_png(256 + i)) for i in range(IMAGES)])


def _wait_done(batches: BatchStack, batch_id: str, at_least: int) -> None:
    wait_until(
        lambda: batches.status(batch_id)["counts"]["done"] >= at_least, 60, f"{at_least} done"
    )


def _assert_nothing_lost_or_doubled(batches: BatchStack, batch_id: str) -> None:
    status = batches.wait_final(batch_id, 120)
    lines = [json.loads(line) for line in batches.results(batch_id, "jsonl").text.splitlines()]
    hashes = {line["content_sha256"] for line in lines}
    engine = create_engine(f"sqlite:///{batches.tmp / 'results.db'}")
    with engine.connect() as connection:
        stored = connection.execute(
            text("SELECT findings FROM analyses WHERE tenant = 'clinic-a'")
        ).scalars()
        stored_hashes = [json.loads(findings)["image"]["content_sha256"] for findings in stored]
    engine.dispose()
    record(
        "faults",
        injected=1,
        accepted_lost=IMAGES - len(hashes & set(stored_hashes)),
        duplicates=len(stored_hashes) - len(set(stored_hashes)),
    )
    assert status["state"] == "completed", status
    assert status["counts"]["done"] == IMAGES
    assert [line["position"] for line in lines] == list(range(IMAGES))
    assert all(line["state"] == "done" and line["findings"] for line in lines)
    assert len(hashes) == IMAGES
    assert sorted(stored_hashes) == sorted(hashes)  # one stored analysis per image


def test_a_worker_killed_mid_batch_loses_nothing(batches: BatchStack) -> None:
    started = time.monotonic()
    batch_id = _submit(batches)
    _wait_done(batches, batch_id, 8)
    batches.kill_worker(batches.workers[0])
    assert batches.status(batch_id)["counts"]["pending"] > 0  # killed mid-batch
    batches.start_worker()
    _assert_nothing_lost_or_doubled(batches, batch_id)
    print(f"worker kill: {time.monotonic() - started:.1f} s")


def test_a_broker_restart_mid_batch_loses_nothing(batches: BatchStack) -> None:
    started = time.monotonic()
    batch_id = _submit(batches)
    _wait_done(batches, batch_id, 8)
    batches.redis.stop()  # no persistence: the queue is gone
    time.sleep(1.0)
    batches.redis.start()
    _assert_nothing_lost_or_doubled(batches, batch_id)
    gateway = batches.stack.services["gateway"].log
    assert "sent lost batch images again" in gateway
    print(f"broker restart: {time.monotonic() - started:.1f} s")


def test_a_backend_down_is_retried_with_backoff_until_it_is_back(batches: BatchStack) -> None:
    started = time.monotonic()
    batches.stack.services["lesion"].stop()
    batch_id = batches.submit([(f"r{i}.png", fundus_png(400 + i)) for i in range(3)])
    worker = batches.workers[0]
    wait_until(lambda: worker.log.count("retrying batch image") >= 2, 30, "retries")
    assert batches.status(batch_id)["counts"]["done"] == 0
    batches.stack.start_backend("lesion")
    status = batches.wait_final(batch_id, 90)
    record("faults", injected=1, accepted_lost=3 - status["counts"]["done"])
    assert status["state"] == "completed", status
    retries = [
        json.loads(line)
        for line in worker.log.splitlines()
        if "retrying batch image" in line and line.startswith("{")
    ]
    assert {(r["backend"], r["code"]) for r in retries} == {("lesion", "UNAVAILABLE")}
    print(f"backend down: {time.monotonic() - started:.1f} s")
