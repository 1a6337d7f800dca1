"""The worker's Prometheus metrics and request ids, from a real worker process: tasks that
succeed, retry and fail, run by a pool of two processes and summed on one /metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
from celery.result import AsyncResult
from prometheus_client.parser import text_string_to_metric_families

from services.worker.broker import create_celery
from services.worker.settings import WorkerSettings
from tests.conftest import ServiceProcess, free_port, fundus_png, wait_until

pytestmark = pytest.mark.slow
TASK = "retinal.analyze_image"


def _samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_task_outcomes_and_durations_are_served_and_logs_carry_task_ids(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    good.write_bytes(fundus_png())
    bad.write_bytes(b"not an image at all")
    # No Redis and no backends: the embedded broker, and gRPC addresses nothing listens on (the
    # good image's task retries once on UNAVAILABLE, then reports the failure).
    redis_url, port = f"redis://127.0.0.1:{free_port()}/0", free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RETINAL_")},
        "REDIS_URL": redis_url,
        "RETINAL_WORKER_EMBEDDED_BROKER_DIR": str(tmp_path / "queue"),
        "RETINAL_WORKER_ANALYSIS_ADDR": f"127.0.0.1:{free_port()}",
        "RETINAL_WORKER_LESION_ADDR": f"127.0.0.1:{free_port()}",
        "RETINAL_WORKER_MAX_RETRIES": "1",
        "RETINAL_WORKER_CONCURRENCY": "2",
        "RETINAL_WORKER_METRICS_PORT": str(port),
    }
    worker = ServiceProcess("worker", env, tmp_path / "worker.log")
    worker.start()
    try:
        wait_until(lambda: "ready" in worker.log, 60, "the worker")
        client = create_celery(
            WorkerSettings(redis_url=redis_url, embedded_broker_dir=tmp_path / "queue")
        )
        refused = client.send_task(TASK, args=[str(bad)])
        retried = client.send_task(TASK, args=[str(good)])
        broken = client.send_task(TASK, args=[])  # a missing argument: the task raises
        for result in (refused, retried, broken):
            wait_until(lambda r=result: r.ready(), 60, "a task")
        assert refused.get()["error"]["code"] == "unsupported_format"
        assert retried.get()["error"]["code"] == "unavailable"
        assert broken.failed()
        samples = _samples(port)
    finally:
        assert worker.stop() == 0

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted({"task": TASK, **labels}.items()))), 0.0)

    assert value("retinal_worker_tasks_started_total") == 4  # the retry runs again
    finished = "retinal_worker_tasks_finished_total"
    assert value(finished, outcome="succeeded") == 2
    assert value(finished, outcome="retried") == 1
    assert value(finished, outcome="failed") == 1
    duration = "retinal_worker_task_duration_seconds_count"
    assert value(duration, outcome="succeeded") == 2
    assert value(duration, outcome="failed") == 1
    _assert_logged_with_its_task_id(worker.log, retried)


def _assert_logged_with_its_task_id(log: str, result: AsyncResult) -> None:  # type: ignore[type-arg]
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    (retrying,) = [r for r in records if r.get("message") == "retrying"]
    assert retrying["request_id"] == result.id
