"""Choosing the queue: Redis when one answers, otherwise an embedded filesystem broker."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import redis

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
