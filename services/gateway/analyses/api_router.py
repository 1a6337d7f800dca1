"""HTTP surface of analyses: one fundus image in, its findings out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile

from services.gateway.analyses.protocol import AnalysisResponse
from services.gateway.analyses.serving import analyze_upload
from services.gateway.problems import PROBLEM_RESPONSES, Problem

router = APIRouter(prefix="/v1", tags=["analyses"])


@router.post("/analyses", response_model=AnalysisResponse, responses=PROBLEM_RESPONSES)
async def create_analysis(
    request: Request,
    file: Annotated[UploadFile, File(description="JPEG, PNG, TIFF, WebP, BMP or DICOM")],
    pixel_size_um: Annotated[
        float | None,
        Form(gt=0, le=100, description="Micrometres per pixel, when known (wins over DICOM)"),
    ] = None,
) -> AnalysisResponse:
    """Analyse one colour fundus photograph (the format is read from its content)."""
    settings = request.app.state.settings
    data = await file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise Problem(
            413,
            "too_large_bytes",
            "The image was refused",
            f"the upload exceeds {settings.max_upload_mb} MiB",
        )
    return await analyze_upload(
        data,
        pixel_size_um=pixel_size_um,
        limits=request.app.state.ingest_limits,
        backends=request.app.state.backends.pipeline,
    )
