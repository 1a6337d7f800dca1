"""HTTP surface of batches: many images (files or one zip) in, progress and result tables out."""

from __future__ import annotations

import asyncio
import logging
import shutil
import uuid
from typing import Annotated

import redis
from fastapi import APIRouter, File, Path, Request, Response, UploadFile
from fastapi.responses import StreamingResponse
from kombu.exceptions import OperationalError as BrokerError

from services.gateway.analyses.api_router import OverlaysForm, PixelSizeForm, parse_overlays
from services.gateway.batches import results
from services.gateway.batches.admission import BatchRefused, Limits, admit
from services.gateway.batches.protocol import BatchOptions, BatchStatus
from services.gateway.problems import PROBLEM_RESPONSES, Problem, out_of_space, storage_full
from services.gateway.rate_limits import AnalysisTenant, RequestTenant
from services.gateway.store import BatchRecord, ResultsStore

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["batches"])

BatchId = Annotated[str, Path(max_length=64, description="The id POST /v1/batches returned")]


def _not_found(batch_id: str) -> Problem:
    return Problem(404, "not-found", "No such batch", f"no batch {batch_id!r}")


async def _record(request: Request, tenant: str, batch_id: str) -> BatchRecord:
    store: ResultsStore = request.app.state.store
    record = await asyncio.to_thread(store.get_batch, tenant, batch_id)
    if record is None:
        raise _not_found(batch_id)
    return record


# OpenAPI links: what a client (or schemathesis's stateful phase) can do with a new batch's id.
_BATCH_LINKS = {
    name: {
        "operationRef": f"#/paths/~1v1~1batches~1{{batch_id}}{suffix}/{method}",
        "parameters": {"batch_id": "$response.body#/id"},
    }
    for name, suffix, method in (
        ("GetBatch", "", "get"),
        ("CancelBatch", "", "delete"),
        ("GetResultsJsonl", "~1results.jsonl", "get"),
        ("GetResultsCsv", "~1results.csv", "get"),
    )
}


@router.post(
    "/batches",
    status_code=202,
    response_model=BatchStatus,
    responses={202: {"links": _BATCH_LINKS}, **PROBLEM_RESPONSES},
)
async def create_batch(
    request: Request,
    response: Response,
    tenant: AnalysisTenant,
    files: Annotated[
        list[UploadFile],
        File(description="Image files (as for /v1/analyses) and/or zip archives of them"),
    ],
    pixel_size_um: PixelSizeForm = None,
    overlays: OverlaysForm = None,
) -> BatchStatus:
    """Accept a batch: every file is stored and queued, or refused with its reason."""
    settings = request.app.state.settings
    options = BatchOptions(pixel_size_um=pixel_size_um, overlays=parse_overlays(overlays))
    if sum(upload.size or 0 for upload in files) > settings.batch_max_upload_bytes:
        raise Problem(
            413,
            "batch-too-large",
            "The batch was refused",
            f"the upload exceeds {settings.batch_max_upload_mb} MiB",
        )
    limits = Limits(
        max_member_bytes=settings.max_upload_bytes,
        max_total_bytes=settings.batch_max_total_bytes,
        max_images=settings.batch_max_images,
        max_compression_ratio=settings.batch_max_compression_ratio,
    )
    batch_id = str(uuid.uuid4())
    folder = settings.batch_dir / batch_id
    # A part without a file name still gets a distinct name in the results.
    uploads = [(f.filename or f"upload-{i}", f.file) for i, f in enumerate(files)]
    store: ResultsStore = request.app.state.store
    try:
        images = await asyncio.to_thread(admit, uploads, folder, limits)
        queued = await asyncio.to_thread(
            store.create_batch, batch_id, tenant, options.model_dump(), images
        )
    except BatchRefused as refused:
        shutil.rmtree(folder, ignore_errors=True)
        raise Problem(413, refused.code, "The batch was refused", refused.detail) from refused
    except BaseException as error:
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(error, OSError) and out_of_space(error):
            logger.error("batch folder full", extra={"batch_id": batch_id})
            raise storage_full() from error
        raise
    logger.info("batch accepted", extra={"batch_id": batch_id, "images": len(images)})
    try:
        await asyncio.to_thread(request.app.state.batch_queue.enqueue, store, queued)
    except (BrokerError, redis.RedisError) as error:
        # Stored, so not lost: the reconciler sends the tasks once the broker answers.
        logger.warning("broker unavailable", extra={"error": type(error).__name__})
    response.headers["Location"] = f"/v1/batches/{batch_id}"
    return BatchStatus.of(await _record(request, tenant, batch_id))


@router.get("/batches/{batch_id}", response_model=BatchStatus, responses=PROBLEM_RESPONSES)
async def get_batch(request: Request, tenant: RequestTenant, batch_id: BatchId) -> BatchStatus:
    """A batch's state, its counts per image state and every image's error."""
    return BatchStatus.of(await _record(request, tenant, batch_id))


@router.delete("/batches/{batch_id}", response_model=BatchStatus, responses=PROBLEM_RESPONSES)
async def cancel_batch(request: Request, tenant: RequestTenant, batch_id: BatchId) -> BatchStatus:
    """Cancel the images no worker has started (those running finish)."""
    store: ResultsStore = request.app.state.store
    if not await asyncio.to_thread(store.cancel_batch, tenant, batch_id):
        raise _not_found(batch_id)
    logger.info("batch cancelled", extra={"batch_id": batch_id})
    return BatchStatus.of(await _record(request, tenant, batch_id))


@router.get(
    "/batches/{batch_id}/results.jsonl",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}}}, **PROBLEM_RESPONSES},
)
async def get_results_jsonl(
    request: Request, tenant: RequestTenant, batch_id: BatchId
) -> StreamingResponse:
    """One line per image in upload order: its state, its error or its findings."""
    await _record(request, tenant, batch_id)
    rows = results.jsonl(request.app.state.store, batch_id)
    return StreamingResponse(rows, media_type="application/x-ndjson")


@router.get(
    "/batches/{batch_id}/results.csv",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}}, **PROBLEM_RESPONSES},
)
async def get_results_csv(
    request: Request, tenant: RequestTenant, batch_id: BatchId
) -> StreamingResponse:
    """One row per image with AutoMorph's column names and ours (as `retinal analyze --csv`)."""
    await _record(request, tenant, batch_id)
    rows = results.csv_rows(request.app.state.store, batch_id)
    return StreamingResponse(rows, media_type="text/csv; charset=utf-8")
