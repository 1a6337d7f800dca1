"""The logic behind /v1/analyses: ingest once, reuse a stored result, else the backends."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image

from services.gateway.analyses.protocol import AnalysisResponse
from services.gateway.store import ResultsStore, StoredAnalysis
from shared import pipeline
from shared.imaging import IngestLimits, ingest


def cache_key(
    content_sha256: str, pixel_size_um: float | None, overlays: Sequence[str], models: list[str]
) -> str:
    """What makes a result: the image's bytes, the options and the models' versions."""
    identity = {
        "content": content_sha256,
        "pixel_size_um": pixel_size_um,
        "overlays": sorted(overlays),
        "models": models,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


# The longest side of the chat image: twice the 224-px vision tower of RetinalGPT-mini, and
# above the 336 px of the published RetinalGPT's CLIP, so either sees all it can use.
CHAT_IMAGE_MAX_SIDE = 448


def chat_image_png(rgb: np.ndarray) -> bytes:
    """The field-of-view crop, downscaled to CHAT_IMAGE_MAX_SIDE at most, as PNG."""
    image = Image.fromarray(rgb)
    image.thumbnail((CHAT_IMAGE_MAX_SIDE, CHAT_IMAGE_MAX_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def response(stored: StoredAnalysis, cached: bool) -> AnalysisResponse:
    return AnalysisResponse(
        id=stored.id,
        created_at=stored.created_at,
        cached=cached,
        overlays={
            layer: f"/v1/analyses/{stored.id}/overlays/{layer}.png"
            for layer in stored.overlay_layers
        },
        findings=stored.findings,
    )


async def analyze_upload(
    data: bytes,
    *,
    tenant: str,
    request_id: str,
    pixel_size_um: float | None,
    overlays: Sequence[str],
    limits: IngestLimits,
    backends: pipeline.Backends,
    store: ResultsStore,
) -> AnalysisResponse:
    started = time.perf_counter()
    # Decoding a large photograph is CPU work: keep it off the event loop.
    ingested = await asyncio.to_thread(ingest, data, limits=limits, pixel_size_um=pixel_size_um)
    ingest_ms = pipeline.elapsed_ms(started)
    models = await pipeline.model_versions(backends, request_id)
    key = cache_key(ingested.info.content_sha256, pixel_size_um, overlays, models)
    stored = await asyncio.to_thread(store.find_cached, tenant, key)
    if stored is not None:
        if not stored.has_chat_image:  # stored before chat images were kept
            png = await asyncio.to_thread(chat_image_png, ingested.rgb)
            await asyncio.to_thread(store.keep_chat_image, stored.id, png)
        return response(stored, cached=True)
    analysis = await pipeline.analyze(backends, ingested, overlays, request_id)
    analysis.findings.timings_ms["ingest"] = ingest_ms
    analysis.findings.timings_ms["total"] = pipeline.elapsed_ms(started)
    png = await asyncio.to_thread(chat_image_png, ingested.rgb)
    stored = await asyncio.to_thread(
        store.save_analysis, tenant, key, analysis.findings, analysis.overlays, png
    )
    return response(stored, cached=False)
