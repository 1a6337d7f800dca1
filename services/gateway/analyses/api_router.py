"""HTTP surface of analyses: one fundus image in, its findings and overlays out."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, File, Form, Path, Request, UploadFile
from fastapi.responses import Response

from services.gateway import fhir
from services.gateway.analyses.protocol import AnalysisResponse
from services.gateway.analyses.serving import analyze_upload, response
from services.gateway.problems import PROBLEM_RESPONSES, Problem
from services.gateway.rate_limits import AnalysisTenant, RequestTenant
from shared.pipeline import OVERLAY_LAYERS

router = APIRouter(prefix="/v1", tags=["analyses"])

FHIR_JSON = "application/fhir+json"

AnalysisId = Annotated[str, Path(max_length=64, description="The id POST /v1/analyses returned")]


# Form fields of every upload that is analysed (one image here, a batch in batches/).
PixelSizeForm = Annotated[
    float | None,
    Form(gt=0, le=100, description="Micrometres per pixel, when known (wins over DICOM)"),
]
OverlaysForm = Annotated[
    str | None,
    Form(
        description=f"Comma-separated overlay layers to render: {', '.join(OVERLAY_LAYERS)}",
        max_length=200,
    ),
]


def parse_overlays(value: str | None) -> list[str]:
    """Comma-separated layer names -> unique names in order; 422 for an unknown one."""
    layers = list(dict.fromkeys(filter(None, (p.strip() for p in (value or "").split(",")))))
    unknown = [layer for layer in layers if layer not in OVERLAY_LAYERS]
    if unknown:
        raise Problem(
            422,
            "validation-error",
            "The request is not valid",
            f"unknown overlay layers {unknown}; known: {', '.join(OVERLAY_LAYERS)}",
        )
    return layers


def not_found(analysis_id: str) -> Problem:
    return Problem(404, "not-found", "No such analysis", f"no analysis {analysis_id!r}")


@router.post("/analyses", response_model=AnalysisResponse, responses=PROBLEM_RESPONSES)
async def create_analysis(
    request: Request,
    tenant: AnalysisTenant,
    file: Annotated[UploadFile, File(description="JPEG, PNG, TIFF, WebP, BMP or DICOM")],
    pixel_size_um: PixelSizeForm = None,
    overlays: OverlaysForm = None,
) -> AnalysisResponse:
    """Analyse one colour fundus photograph (the format is read from its content)."""
    settings = request.app.state.settings
    layers = parse_overlays(overlays)
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
        tenant=tenant,
        request_id=request.state.request_id,
        pixel_size_um=pixel_size_um,
        overlays=layers,
        limits=request.app.state.ingest_limits,
        backends=request.app.state.backends.pipeline,
        store=request.app.state.store,
    )


@router.get("/analyses/{analysis_id}", response_model=AnalysisResponse, responses=PROBLEM_RESPONSES)
async def get_analysis(
    request: Request, tenant: RequestTenant, analysis_id: AnalysisId
) -> AnalysisResponse:
    """A stored analysis of this tenant."""
    stored = await asyncio.to_thread(request.app.state.store.get_analysis, tenant, analysis_id)
    if stored is None:
        raise not_found(analysis_id)
    return response(stored, cached=True)


@router.get(
    "/analyses/{analysis_id}/overlays/{layer}.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **PROBLEM_RESPONSES},
)
async def get_overlay(
    request: Request,
    tenant: RequestTenant,
    analysis_id: AnalysisId,
    layer: Annotated[str, Path(max_length=32, description="A layer the analysis rendered")],
) -> Response:
    """One overlay PNG of a stored analysis (pixels of the field-of-view crop)."""
    png = await asyncio.to_thread(request.app.state.store.get_overlay, tenant, analysis_id, layer)
    if png is None:
        raise Problem(
            404,
            "not-found",
            "No such overlay",
            f"analysis {analysis_id!r} has no overlay {layer!r}",
        )
    return Response(png, media_type="image/png")


@router.get(
    "/analyses/{analysis_id}/fhir",
    response_class=Response,
    responses={200: {"content": {FHIR_JSON: {}}}, **PROBLEM_RESPONSES},
)
async def get_fhir(request: Request, tenant: RequestTenant, analysis_id: AnalysisId) -> Response:
    """The analysis as a FHIR R4 Bundle: a DiagnosticReport and its Observations."""
    stored = await asyncio.to_thread(request.app.state.store.get_analysis, tenant, analysis_id)
    if stored is None:
        raise not_found(analysis_id)
    return Response(fhir.bundle(stored).model_dump_json(exclude_none=True), media_type=FHIR_JSON)
