"""The Celery worker as a real process: Redis when it answers, the embedded broker otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from celery import Celery

from services.worker.app import create_celery
from services.worker.settings import WorkerSettings
from tests.conftest import RedisServer, ServiceProcess, Stack, free_port, fundus_png, wait_until

pytestmark = pytest.mark.slow


def _worker(stack: Stack, tmp_path: Path, redis_url: str) -> ServiceProcess:
    env = {
        **stack.env,
        "REDIS_URL": redis_url,
        "RETINAL_WORKER_EMBEDDED_BROKER_DIR": str(tmp_path / "queue"),
    }
    return ServiceProcess("worker", env, tmp_path / "worker.log")


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    good.write_bytes(fundus_png())
    bad.write_bytes(b"not an image at all")
    return {"good": good, "bad": bad}


def _client(redis_url: str, tmp_path: Path) -> Celery:
    return create_celery(
        WorkerSettings(redis_url=redis_url, embedded_broker_dir=tmp_path / "queue")
    )


def _run_tasks(client: Celery, images: dict[str, Path], worker: ServiceProcess) -> dict[str, dict]:  # type: ignore[type-arg]
    results = {
        name: client.send_task("retinal.analyze_image", args=[str(path)])
        for name, path in images.items()
    }
    assert worker.process is not None
    for result in results.values():
        wait_until(lambda r=result: r.ready() or worker.process.poll() is not None, 90, "a task")
        assert worker.process.poll() is None, worker.log[-3000:]
    return {name: result.get(timeout=5) for name, result in results.items()}


def _assert_outcomes(outcomes: dict[str, dict]) -> None:  # type: ignore[type-arg]
    assert outcomes["good"]["status"] == "done"
    stages = {s["stage"]: s["state"] for s in outcomes["good"]["findings"]["stages"]}
    assert stages["analysis"] == "ok"
    assert outcomes["good"]["findings"]["quality"]["grade"] in {"good", "usable", "reject"}
    assert outcomes["bad"] == {
        "status": "failed",
        "error": {"code": "unsupported_format", "detail": outcomes["bad"]["error"]["detail"]},
    }


def test_tasks_run_through_redis(
    backends: Stack, redis_server: RedisServer, tmp_path: Path, images: dict[str, Path]
) -> None:
    worker = _worker(backends, tmp_path, redis_server.url)
    worker.start()
    try:
        _assert_outcomes(_run_tasks(_client(redis_server.url, tmp_path), images, worker))
        assert "embedded" not in worker.log
    finally:
        assert worker.stop() == 0


def test_without_redis_the_embedded_broker_carries_the_tasks(
    backends: Stack, tmp_path: Path, images: dict[str, Path]
) -> None:
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    worker = _worker(backends, tmp_path, unreachable)
    worker.start()
    try:
        wait_until(lambda: "embedded filesystem broker" in worker.log, 30, "the worker's log")
        client = _client(unreachable, tmp_path)
        assert client.conf.retinal_embedded_broker
        _assert_outcomes(_run_tasks(client, images, worker))
    finally:
        assert worker.stop() == 0
    assert not os.listdir(tmp_path / "queue" / "messages")
