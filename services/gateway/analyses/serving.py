"""The logic behind /v1/analyses: ingest once, then the backends."""

from __future__ import annotations

import asyncio
import time

from services.gateway.analyses.protocol import AnalysisResponse
from shared import pipeline
from shared.imaging import IngestLimits, ingest


async def analyze_upload(
    data: bytes,
    *,
    pixel_size_um: float | None,
    limits: IngestLimits,
    backends: pipeline.Backends,
) -> AnalysisResponse:
    started = time.perf_counter()
    # Decoding a large photograph is CPU work: keep it off the event loop.
    ingested = await asyncio.to_thread(ingest, data, limits=limits, pixel_size_um=pixel_size_um)
    ingest_ms = pipeline.elapsed_ms(started)
    findings = await pipeline.analyze(backends, ingested)
    findings.timings_ms["ingest"] = ingest_ms
    findings.timings_ms["total"] = pipeline.elapsed_ms(started)
    return AnalysisResponse(findings=findings)
