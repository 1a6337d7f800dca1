"""One image through the backends: used by the gateway and by the batch worker alike.

The analysis and lesion services are called concurrently over gRPC, each with a deadline.
A backend that answers UNIMPLEMENTED (its models are not installed) becomes a stage marked
"unavailable" in the findings; any other gRPC error is raised as BackendError for the caller
to map (HTTP problem, task retry). Lesion positions and the screening assessment are
computed here, once both answers are in: they need the anatomy and the lesions together.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from protos.retinal.v1 import (
    analysis_pb2,
    analysis_pb2_grpc,
    common_pb2,
    lesion_pb2,
    lesion_pb2_grpc,
)
from shared import findings, pixels
from shared.assessment import assess
from shared.convert import findings_from_proto, from_proto
from shared.imaging import IngestedImage
from shared.lesion_positions import position_lesions
from shared.telemetry import outgoing_metadata


class BackendError(Exception):
    def __init__(self, service: str, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(f"{service}: {code.name}: {detail}")
        self.service = service
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Backends:
    analysis: analysis_pb2_grpc.AnalysisServiceStub
    lesion: lesion_pb2_grpc.LesionServiceStub
    analysis_deadline_s: float
    lesion_deadline_s: float


def _unavailable(stage: str, error: grpc.aio.AioRpcError) -> findings.StageStatus:
    return findings.StageStatus(
        stage=stage, state=findings.StageState.UNAVAILABLE, detail=error.details() or ""
    )


async def _call(service: str, call: grpc.aio.UnaryUnaryCall) -> object:  # type: ignore[type-arg]
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.UNIMPLEMENTED:
            return error
        raise BackendError(service, error.code(), error.details() or "") from error


# Overlay layers each service renders (the analysis service's and the lesion service's).
ANALYSIS_OVERLAYS = ("combined", "vessels", "disc", "zones", "fovea")
LESION_OVERLAYS = ("lesions", "ma", "he", "ex", "se")
OVERLAY_LAYERS = (*ANALYSIS_OVERLAYS, *LESION_OVERLAYS)


@dataclass
class Analysis:
    findings: findings.Findings
    overlays: dict[str, bytes] = field(default_factory=dict)  # layer -> PNG, FOV-crop pixels


# A model listing is quick; a backend that takes longer is stalled. Never past the call's own
# deadline, so that a stalled backend is a timeout within the deadline the operator set.
LIST_MODELS_DEADLINE_S = 5.0


async def model_versions(backends: Backends, request_id: str | None = None) -> list[str]:
    """Every model the analysis and lesion services serve, as sorted "name@version:sha256".

    With the image's content hash this identifies a result: same image, same models, same
    findings. A backend without models (UNIMPLEMENTED) contributes nothing.
    """
    metadata = outgoing_metadata(request_id)
    replies = await asyncio.gather(
        _call(
            "analysis",
            backends.analysis.ListModels(
                common_pb2.ListModelsRequest(),
                timeout=min(LIST_MODELS_DEADLINE_S, backends.analysis_deadline_s),
                metadata=metadata,
            ),
        ),
        _call(
            "lesion",
            backends.lesion.ListModels(
                common_pb2.ListModelsRequest(),
                timeout=min(LIST_MODELS_DEADLINE_S, backends.lesion_deadline_s),
                metadata=metadata,
            ),
        ),
    )
    return sorted(
        f"{card.name}@{card.version}:{card.sha256}"
        for reply in replies
        if isinstance(reply, common_pb2.ListModelsResponse)
        for card in reply.models
    )


async def analyze(
    backends: Backends,
    image: IngestedImage,
    overlays: Sequence[str] = (),
    request_id: str | None = None,
) -> Analysis:
    """The findings of one ingested image, and the overlays asked for (OVERLAY_LAYERS).

    `request_id` travels to both services as gRPC metadata, so their logs carry it.
    """
    unknown = sorted(set(overlays) - set(OVERLAY_LAYERS))
    if unknown:
        raise ValueError(f"unknown overlay layers {unknown}; known: {', '.join(OVERLAY_LAYERS)}")
    started = time.perf_counter()
    message = pixels.to_message(image.rgb, image.info)
    analysis_request = analysis_pb2.AnalyzeRequest(
        image=message, overlays=[layer for layer in overlays if layer in ANALYSIS_OVERLAYS]
    )
    lesion_request = lesion_pb2.DetectRequest(
        image=message, overlays=[layer for layer in overlays if layer in LESION_OVERLAYS]
    )
    metadata = outgoing_metadata(request_id)
    analysis_reply, lesion_reply = await asyncio.gather(
        _call(
            "analysis",
            backends.analysis.Analyze(
                analysis_request, timeout=backends.analysis_deadline_s, metadata=metadata
            ),
        ),
        _call(
            "lesion",
            backends.lesion.Detect(
                lesion_request, timeout=backends.lesion_deadline_s, metadata=metadata
            ),
        ),
    )
    rendered: dict[str, bytes] = {}

    result = findings.Findings(image=image.info)
    if isinstance(analysis_reply, grpc.aio.AioRpcError):
        result.stages.append(_unavailable("analysis", analysis_reply))
    else:
        assert isinstance(analysis_reply, analysis_pb2.AnalyzeResponse)
        result = findings_from_proto(analysis_reply.findings)
        # The analysis echoes the image facts, with a disc-based calibration estimate added
        # when nothing else calibrated the image: keep its copy.
        result.image = result.image or image.info
        rendered.update({overlay.layer: overlay.png for overlay in analysis_reply.overlays})
        result.stages.append(findings.StageStatus(stage="analysis", state=findings.StageState.OK))

    if isinstance(lesion_reply, grpc.aio.AioRpcError):
        result.stages.append(_unavailable("lesion", lesion_reply))
    else:
        assert isinstance(lesion_reply, lesion_pb2.DetectResponse)
        _merge_lesions(result, lesion_reply)
        rendered.update({overlay.layer: overlay.png for overlay in lesion_reply.overlays})
        # The two services ran concurrently: only now are lesions and anatomy side by side.
        size = (image.info.width, image.info.height)
        result.lesions = position_lesions(result.lesions, result, size)
    result.assessment = assess(result)

    result.timings_ms["backends"] = elapsed_ms(started)
    return Analysis(result, {layer: rendered[layer] for layer in overlays if layer in rendered})


def elapsed_ms(started: float) -> float:
    """Milliseconds since `started` (a perf_counter reading), to 0.1 ms."""
    return round((time.perf_counter() - started) * 1000, 1)


def _merge_lesions(result: findings.Findings, reply: lesion_pb2.DetectResponse) -> None:
    result.lesions = [from_proto(lesion, findings.Lesion) for lesion in reply.lesions]
    result.lesion_counts = [from_proto(count, findings.LesionCount) for count in reply.counts]
    result.models.extend(from_proto(model, findings.ModelVersion) for model in reply.models)
    result.timings_ms.update({f"lesion.{k}": v for k, v in reply.timings_ms.items()})
    result.stages.append(findings.StageStatus(stage="lesion", state=findings.StageState.OK))
