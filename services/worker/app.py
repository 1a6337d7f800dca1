"""The Celery application of the batch worker (`celery -A services.worker.app:app`)."""

from __future__ import annotations

from services.worker.broker import create_celery
from services.worker.observability import observe_tasks
from services.worker.settings import WorkerSettings

settings = WorkerSettings()
app = create_celery(settings)
observe_tasks()
