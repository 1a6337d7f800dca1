"""Request ids and Prometheus metrics of the worker's Celery tasks.

Every task's log lines carry its task id as `request_id`, as a gateway call's carry the
request's id. Metrics: tasks started and how they ended (Celery's outcome: a task that records
a refused image has succeeded), and their run times, by task name.

Celery runs tasks in its pool's processes, not in the process that serves /metrics: with
metrics on, `python -m services.worker` puts prometheus_client in its multiprocess mode
(every process writes its values to files in one folder) and serves their sum.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Task, states
from celery.signals import task_postrun, task_prerun
from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, start_http_server

from shared.telemetry import request_id

TASKS_STARTED = Counter("retinal_worker_tasks_started_total", "Celery tasks started", ["task"])
TASKS_FINISHED = Counter(
    "retinal_worker_tasks_finished_total",
    "Celery tasks ended: succeeded, failed (raised), retried, rejected or ignored",
    ["task", "outcome"],
)
TASK_DURATION = Histogram(
    "retinal_worker_task_duration_seconds",
    "Celery task run time, by how it ended",
    ["task", "outcome"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
)
OUTCOMES = {
    states.SUCCESS: "succeeded",
    states.FAILURE: "failed",
    states.RETRY: "retried",
    states.REJECTED: "rejected",
    states.IGNORED: "ignored",
}
# perf_counter() at each running task's start, by task id (in the process running it).
_started: dict[str, float] = {}


def _task_started(task_id: str, task: Task, **_: Any) -> None:
    request_id.set(task_id)  # every log line of this task carries its id
    _started[task_id] = time.perf_counter()
    TASKS_STARTED.labels(task.name).inc()


def _task_ended(task_id: str, task: Task, state: str | None, **_: Any) -> None:
    # No state: the task raised past Celery (a BaseException such as SystemExit).
    outcome = OUTCOMES.get(state or states.FAILURE, "failed")
    TASKS_FINISHED.labels(task.name, outcome).inc()
    started = _started.pop(task_id, None)
    if started is not None:
        TASK_DURATION.labels(task.name, outcome).observe(time.perf_counter() - started)


def observe_tasks() -> None:
    """Count, time and name (request id) every task this process runs."""
    task_prerun.connect(_task_started, weak=False)
    task_postrun.connect(_task_ended, weak=False)


def serve_metrics(host: str, port: int) -> None:
    """/metrics on host:port: the sum over the worker's processes (multiprocess mode)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    start_http_server(port, addr=host, registry=registry)
