"""The Celery application of the batch worker (`celery -A services.worker.app:app`)."""

from __future__ import annotations

from celery import Celery

from services.worker.broker import choose_broker
from services.worker.settings import WorkerSettings


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


settings = WorkerSettings()
app = create_celery(settings)
