"""Sending batch images to the worker's queue, and sending again what the queue lost.

The results store says what must be done; the broker only carries it. Each task is sent
under the broker's *epoch*: a random id kept in the broker itself (a Redis key set once),
which disappears with the broker's data. When Redis restarts without its data, is flushed or
replaced, its epoch changes, and the reconciler (a loop in the gateway) sends again every
queued image sent under another epoch. It also sends an image whose worker's lease ended
(the worker died holding it), one never sent (its sender failed) and, once the queue is empty,
one still unclaimed long after sending (a worker died between taking its task and claiming
it; Redis would hold that task back for an hour). Sending twice is safe:
a worker claims an image only while it is queued, so a duplicate message does nothing.

The embedded filesystem broker keeps messages as files, which outlive every process: its
epoch never changes. A Redis that keeps its data (AOF) keeps its epoch and its messages.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import redis
from celery import Celery
from kombu.exceptions import OperationalError as BrokerError
from prometheus_client import Gauge
from sqlalchemy.exc import OperationalError as StoreError

from services.gateway.store import ImageState, ResultsStore
from services.worker.broker import create_celery
from services.worker.settings import WorkerSettings

logger = logging.getLogger(__name__)

TASK = "retinal.analyze_batch_image"
EPOCH_KEY = "retinal:broker-epoch"
EMBEDDED_EPOCH = "embedded"
QUEUE = "celery"  # Celery's default queue: a Redis list of that name

BATCH_IMAGES = Gauge(
    "retinal_batch_images", "Images of every batch by state (at the last reconciliation)", ["state"]
)
QUEUE_DEPTH = Gauge(
    "retinal_batch_queue_depth", "Tasks waiting in the broker (at the last reconciliation)"
)
REQUEUED = Gauge("retinal_batch_requeued", "Images sent again by the last reconciliation")


class BatchQueue:
    def __init__(self, settings: WorkerSettings) -> None:
        self.celery: Celery = create_celery(settings)
        self.redis = (
            None
            if self.celery.conf.retinal_embedded_broker
            else redis.Redis.from_url(
                settings.redis_url, socket_timeout=5, socket_connect_timeout=5
            )
        )

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()

    def epoch(self) -> str:
        """The broker's current epoch (set now if the broker has none)."""
        if self.redis is None:
            return EMBEDDED_EPOCH
        self.redis.set(EPOCH_KEY, uuid.uuid4().hex, nx=True)
        value = self.redis.get(EPOCH_KEY)
        assert isinstance(value, bytes)
        return value.decode()

    def depth(self) -> int | None:
        return None if self.redis is None else int(self.redis.llen(QUEUE))  # type: ignore[arg-type]

    def _send(self, image_id: str) -> None:
        self.celery.send_task(TASK, args=[image_id])

    def enqueue(self, store: ResultsStore, image_ids: list[str]) -> None:
        """Send the tasks of new images. The epoch is read first: should the broker lose its
        data after that, the tasks carry an old epoch and are sent again."""
        if not image_ids:
            return
        epoch = self.epoch()
        for image_id in image_ids:
            self._send(image_id)
        store.mark_sent(image_ids, epoch)

    def reconcile(self, store: ResultsStore, unsent_grace_s: float) -> int:
        """Send again what the broker lost; returns how many images were sent."""
        counts = store.image_counts()
        for state in ImageState:
            BATCH_IMAGES.labels(state.value).set(counts[state])
        if not (counts[ImageState.QUEUED] or counts[ImageState.RUNNING]):
            REQUEUED.set(0)
            return 0  # nothing to watch: the broker is not even asked
        epoch = self.epoch()
        depth = self.depth()
        if depth is not None:
            QUEUE_DEPTH.set(depth)
        sent = 0
        for lost in store.lost_images(epoch, unsent_grace_s, queue_empty=depth == 0):
            if not store.requeue(lost, epoch):
                continue  # changed since it was read: not lost after all, or sent by another
            try:
                self._send(lost.id)
            except BaseException:
                store.unsend(lost.id)
                raise
            sent += 1
        REQUEUED.set(sent)
        if sent:
            logger.warning("sent lost batch images again", extra={"images": sent})
        return sent


async def reconcile_forever(
    queue: BatchQueue, store: ResultsStore, interval_s: float, unsent_grace_s: float
) -> None:
    """The reconciler's loop (a task of the gateway); a broker or store outage is waited out."""
    while True:
        try:
            await asyncio.to_thread(queue.reconcile, store, unsent_grace_s)
        except (BrokerError, redis.RedisError, StoreError) as error:
            logger.warning("reconciliation failed", extra={"error": type(error).__name__})
        await asyncio.sleep(interval_s)
