"""Celery tasks: one image per task, through the same pipeline as the gateway."""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path
from typing import Any

import grpc
from celery import Task

from protos.retinal.v1 import analysis_pb2_grpc, lesion_pb2_grpc
from services.worker.app import app, settings
from shared import pipeline
from shared.config import MIB
from shared.grpc_server import client_options
from shared.imaging import ImageRejected, ingest

logger = logging.getLogger(__name__)

# gRPC codes worth another try: the backend may come back or catch up.
TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


async def _analyze_file(path: Path, pixel_size_um: float | None, request_id: str) -> dict[str, Any]:
    image = ingest(path.read_bytes(), pixel_size_um=pixel_size_um)
    options = client_options(settings.max_message_mb * MIB)
    async with (
        grpc.aio.insecure_channel(settings.analysis_addr, options=options) as analysis,
        grpc.aio.insecure_channel(settings.lesion_addr, options=options) as lesion,
    ):
        backends = pipeline.Backends(
            analysis=analysis_pb2_grpc.AnalysisServiceStub(analysis),
            lesion=lesion_pb2_grpc.LesionServiceStub(lesion),
            analysis_deadline_s=settings.analysis_deadline_s,
            lesion_deadline_s=settings.lesion_deadline_s,
        )
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
            countdown = min(60.0, 2.0**self.request.retries) * random.uniform(0.5, 1.5)
            logger.warning("retrying", extra={"backend": error.service, "code": error.code.name})
            raise self.retry(exc=error, countdown=countdown) from error
        return {
            "status": "failed",
            "error": {"code": error.code.name.lower(), "detail": str(error)},
        }
    return {"status": "done", "findings": findings}
