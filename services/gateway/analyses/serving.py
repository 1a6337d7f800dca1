"""The logic behind /v1/analyses: ingest once, reuse a stored result, else the backends."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Sequence

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
        return response(stored, cached=True)
    analysis = await pipeline.analyze(backends, ingested, overlays, request_id)
    analysis.findings.timings_ms["ingest"] = ingest_ms
    analysis.findings.timings_ms["total"] = pipeline.elapsed_ms(started)
    stored = await asyncio.to_thread(
        store.save_analysis, tenant, key, analysis.findings, analysis.overlays
    )
    return response(stored, cached=False)
