"""Celery tasks: one image per task, through the same pipeline as the gateway.

`retinal.analyze_batch_image` analyses one image of a batch and records the outcome in the
results store, which is the batch's truth (services/gateway/store.py). It claims the image
first: a message redelivered or sent twice finds it claimed or finished and does nothing.
The result is stored like a gateway analysis, under the cache key of the image's content hash,
options and model versions, so an image already analysed by the same models is not analysed
again and a repeated task writes the same row once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from celery import Task

from protos.retinal.v1 import analysis_pb2_grpc, lesion_pb2_grpc
from services.gateway.analyses.serving import analyze_upload
from services.gateway.batches.admission import image_path
from services.gateway.store import ClaimedImage, ResultsStore
from services.worker.app import app, settings
from shared import pipeline
from shared.config import MIB
from shared.grpc_server import client_options
from shared.imaging import DEFAULT_LIMITS, ImageRejected, ingest

logger = logging.getLogger(__name__)

# gRPC codes worth another try: the backend may come back or catch up.
TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@asynccontextmanager
async def _backends() -> AsyncIterator[pipeline.Backends]:
    options = client_options(settings.max_message_mb * MIB)
    async with (
        grpc.aio.insecure_channel(settings.analysis_addr, options=options) as analysis,
        grpc.aio.insecure_channel(settings.lesion_addr, options=options) as lesion,
    ):
        yield pipeline.Backends(
            analysis=analysis_pb2_grpc.AnalysisServiceStub(analysis),
            lesion=lesion_pb2_grpc.LesionServiceStub(lesion),
            analysis_deadline_s=settings.analysis_deadline_s,
            lesion_deadline_s=settings.lesion_deadline_s,
        )


def _countdown(retries: int) -> float:
    """Seconds before the next try: exponential backoff (1, 2, 4, ... 60 s) with jitter."""
    return min(60.0, 2.0**retries) * random.uniform(0.5, 1.5)


async def _analyze_file(path: Path, pixel_size_um: float | None, request_id: str) -> dict[str, Any]:
    image = ingest(path.read_bytes(), pixel_size_um=pixel_size_um)
    async with _backends() as backends:
        analysis = await pipeline.analyze(backends, image, request_id=request_id)
    return analysis.findings.model_dump(mode="json", exclude_none=True)


@app.task(bind=True, name="retinal.analyze_image", max_retries=settings.max_retries)
def analyze_image(self: Task, path: str, pixel_size_um: float | None = None) -> dict[str, Any]:
    """The findings of the image file at `path`, or the reason it failed.

    Bad images fail at once with their ingestion code; transient backend errors are retried
    with exponential backoff and jitter.
    """
    try:
        # The task id names the work in every service's log, as the gateway's request id does.
        findings = asyncio.run(_analyze_file(Path(path), pixel_size_um, self.request.id))
    except ImageRejected as error:
        return {"status": "failed", "error": {"code": error.code, "detail": error.detail}}
    except OSError as error:
        return {"status": "failed", "error": {"code": "unreadable", "detail": error.strerror}}
    except pipeline.BackendError as error:
        if error.code in TRANSIENT and self.request.retries < self.max_retries:
            logger.warning("retrying", extra={"backend": error.service, "code": error.code.name})
            raise self.retry(exc=error, countdown=_countdown(self.request.retries)) from error
        return {
            "status": "failed",
            "error": {"code": error.code.name.lower(), "detail": str(error)},
        }
    return {"status": "done", "findings": findings}


@functools.cache
def _store() -> ResultsStore:
    """One store per worker process (made after the pool forks)."""
    return ResultsStore(settings.results_url)


async def _analyze_claimed(image: ClaimedImage, request_id: str) -> str:
    """The id of the stored analysis of a claimed image (stored now, or found stored)."""
    data = image_path(settings.batch_dir, image.batch_id, image.position).read_bytes()
    async with _backends() as backends:
        stored = await analyze_upload(
            data,
            tenant=image.tenant,
            request_id=request_id,
            pixel_size_um=image.options.get("pixel_size_um"),
            overlays=image.options.get("overlays", []),
            limits=DEFAULT_LIMITS,
            backends=backends,
            store=_store(),
        )
    return stored.id


@app.task(
    bind=True,
    name="retinal.analyze_batch_image",
    max_retries=settings.max_retries,
    ignore_result=True,
)
def analyze_batch_image(self: Task, image_id: str) -> None:
    """Analyse one image of a batch and record its outcome (ids in logs, never names)."""
    store = _store()
    image = store.claim_image(image_id, settings.task_lease_s)
    ids = {"image_id": image_id}
    if image is None:  # finished, cancelled, or another worker's: a repeated message
        logger.info("batch image not queued: nothing to do", extra=ids)
        return
    ids["batch_id"] = image.batch_id
    if image.attempts > settings.max_attempts:
        detail = f"claimed {image.attempts} times without an outcome (its workers died)"
        store.fail_image(image_id, "too_many_attempts", detail)
        logger.error("batch image given up", extra={**ids, "attempts": image.attempts})
        return
    try:
        analysis_id = asyncio.run(_analyze_claimed(image, self.request.id))
    except ImageRejected as error:
        store.fail_image(image_id, error.code, error.detail)
        logger.info("batch image refused", extra={**ids, "code": error.code.value})
        return
    except OSError as error:
        store.fail_image(image_id, "unreadable", error.strerror or type(error).__name__)
        logger.warning("batch image unreadable", extra=ids)
        return
    except pipeline.BackendError as error:
        if error.code in TRANSIENT and self.request.retries < self.max_retries:
            countdown = _countdown(self.request.retries)
            store.release_image(image_id, countdown + settings.task_lease_s)
            logger.warning(
                "retrying batch image",
                extra={**ids, "backend": error.service, "code": error.code.name},
            )
            raise self.retry(exc=error, countdown=countdown) from error
        store.fail_image(image_id, error.code.name.lower(), str(error))
        logger.warning("batch image failed", extra={**ids, "code": error.code.name})
        return
    if store.finish_image(image_id, analysis_id):
        logger.info("batch image done", extra={**ids, "analysis_id": analysis_id})
