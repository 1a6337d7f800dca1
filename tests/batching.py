"""A stack for batch tests: its own Redis, the backends, the gateway and Celery workers."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from services.gateway.tenants import digest, new_key
from shared.healthcheck import grpc_serving
from tests.conftest import RedisServer, ServiceProcess, Stack, free_port, wait_until

KEYS = {"clinic-a": new_key(), "clinic-b": new_key()}
FINAL = {"completed", "completed_with_errors", "cancelled"}


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


@dataclass
class BatchStack:
    tmp: Path
    redis: RedisServer = field(init=False)
    stack: Stack = field(init=False)
    workers: list[ServiceProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.redis = RedisServer(free_port(), self.tmp)
        self.stack = Stack(
            self.tmp,
            extra_env={
                "REDIS_URL": self.redis.url,
                "RETINAL_GATEWAY_API_KEYS": ",".join(f"{t}:{digest(k)}" for t, k in KEYS.items()),
                "RETINAL_GATEWAY_BATCH_RECONCILE_INTERVAL_S": "1",
                "RETINAL_GATEWAY_BATCH_UNSENT_GRACE_S": "3",
                "RETINAL_WORKER_TASK_LEASE_S": "8",
            },
        )

    def start(self) -> None:
        """Redis, the two backends a batch needs (not the language service), the gateway and
        one worker."""
        self.redis.start()
        for name in ("analysis", "lesion"):
            self.stack.services[name].start()
        self.stack.services["gateway"].start()
        for name in ("analysis", "lesion"):
            wait_until(lambda n=name: grpc_serving(self.stack.address(n)), 30, f"{name} SERVING")
        wait_until(self.stack._gateway_up, 30, "the gateway")
        self.start_worker()

    def start_worker(self) -> ServiceProcess:
        worker = ServiceProcess(
            "worker", self.stack.env, self.tmp / f"worker-{len(self.workers)}.log"
        )
        worker.start()
        self.workers.append(worker)
        wait_until(lambda: "ready" in worker.log, 60, "the worker")
        return worker

    def kill_worker(self, worker: ServiceProcess) -> None:
        """SIGKILL the worker and its pool processes at once (a lost machine)."""
        assert worker.process is not None
        parent = psutil.Process(worker.process.pid)
        for process in [*parent.children(recursive=True), parent]:
            process.send_signal(signal.SIGKILL)
        worker.process.wait(timeout=10)

    def stop(self) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.stop()
        self.stack.stop()
        self.redis.stop()

    @property
    def url(self) -> str:
        return self.stack.url

    def submit(self, files: list[tuple[str, bytes]], tenant: str = "clinic-a", **data: str) -> str:
        reply = httpx.post(
            f"{self.url}/v1/batches",
            files=[("files", (name, content)) for name, content in files],
            data=data,
            headers=auth(tenant),
            timeout=60,
        )
        assert reply.status_code == 202, reply.text
        assert reply.headers["Location"] == f"/v1/batches/{reply.json()['id']}"
        return str(reply.json()["id"])

    def status(self, batch_id: str, tenant: str = "clinic-a") -> dict[str, Any]:
        reply = httpx.get(f"{self.url}/v1/batches/{batch_id}", headers=auth(tenant), timeout=30)
        assert reply.status_code == 200, reply.text
        return dict(reply.json())

    def wait_final(self, batch_id: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.status(batch_id)
            if status["state"] in FINAL:
                return status
            time.sleep(0.5)
        logs = "".join(w.log[-2000:] for w in self.workers)
        raise TimeoutError(f"batch not final after {timeout_s} s: {status}\n{logs}")

    def results(self, batch_id: str, fmt: str, tenant: str = "clinic-a") -> httpx.Response:
        return httpx.get(
            f"{self.url}/v1/batches/{batch_id}/results.{fmt}", headers=auth(tenant), timeout=60
        )
