"""Choosing the queue: Redis when one answers, otherwise an embedded filesystem broker; and
the Celery application on it (the worker's, and the gateway's for sending batch tasks)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery

from services.worker.settings import WorkerSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerChoice:
    broker_url: str
    result_backend: str
    transport_options: dict[str, Any] = field(default_factory=dict)
    embedded: bool = False


def redis_reachable(url: str, timeout_s: float = 1.0) -> bool:
    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
        return bool(client.ping())
    except (redis.RedisError, ValueError):
        return False


def _safe(settings: WorkerSettings) -> str:
    """The Redis URL without credentials, for logs."""
    return settings.redis_url.rsplit("@", 1)[-1]


def choose_broker(settings: WorkerSettings) -> BrokerChoice:
    if redis_reachable(settings.redis_url):
        logger.info("using Redis as broker and result backend", extra={"redis": _safe(settings)})
        return BrokerChoice(settings.redis_url, settings.redis_url)
    # kombu's filesystem transport: messages are files, shared by every process on this machine.
    root = settings.embedded_broker_dir.resolve()
    messages, processed, results = root / "messages", root / "processed", root / "results"
    control = root / "control"
    for folder in (messages, processed, results, control):
        folder.mkdir(parents=True, exist_ok=True)
    logger.warning(
        "no Redis answered; using the embedded filesystem broker (single machine only)",
        extra={"redis": _safe(settings), "broker_dir": str(root)},
    )
    return BrokerChoice(
        broker_url="filesystem://",
        result_backend=f"file://{results}",
        transport_options={
            "data_folder_in": str(messages),
            "data_folder_out": str(messages),
            "processed_folder": str(processed),
            "control_folder": str(control),
            "store_processed": False,
        },
        embedded=True,
    )


def create_celery(settings: WorkerSettings) -> Celery:
    choice = choose_broker(settings)
    celery = Celery("retinal", broker=choice.broker_url, backend=choice.result_backend)
    celery.conf.update(
        broker_transport_options=choice.transport_options,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # A task is acknowledged only when done, and re-queued if its worker dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        result_extended=True,
        imports=["services.worker.tasks"],
    )
    celery.conf.retinal_embedded_broker = choice.embedded
    return celery
