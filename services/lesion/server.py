"""The lesion service's gRPC surface: MA, HE, EX, SE detection and the screening assessment."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import grpc
import numpy as np

from protos.retinal.v1 import common_pb2, findings_pb2, lesion_pb2, lesion_pb2_grpc
from services.lesion.engine.detection import detect, model_versions
from services.lesion.engine.detector import SHORT_NAMES, LesionDetector
from services.lesion.engine.overlays import LAYERS, layer_types, mask_png, render
from services.lesion.settings import LesionSettings
from shared import findings, grpc_server, pixels
from shared.convert import findings_from_proto, from_proto, to_proto
from shared.model_cards import export_model_info, model_card

SERVICE_NAME = lesion_pb2.DESCRIPTOR.services_by_name["LesionService"].full_name
# DetectRequest.masks names the 0/255 masks to return: "ma", "he", "ex", "se".
MASK_LAYERS = {short: lesion_type for lesion_type, short in SHORT_NAMES.items()}


class LesionServicer(lesion_pb2_grpc.LesionServiceServicer):
    def __init__(self, detector: LesionDetector, settings: LesionSettings) -> None:
        self.detector = detector
        self.max_per_type = settings.max_lesions_per_type
        # CPU-bound work off the event loop, so health checks answer while an image runs.
        self.executor = ThreadPoolExecutor(
            settings.concurrent_detections, thread_name_prefix="lesion"
        )

    async def Detect(
        self, request: lesion_pb2.DetectRequest, context: grpc.aio.ServicerContext
    ) -> lesion_pb2.DetectResponse:
        try:
            rgb = pixels.from_message(request.image)
        except pixels.InvalidImageMessage as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        for asked, known, what in (
            (request.overlays, LAYERS, "overlay"),
            (request.masks, MASK_LAYERS, "mask"),
        ):
            unknown = sorted(set(asked) - set(known))
            if unknown:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"unknown {what} layers {unknown}; known: {', '.join(known)}",
                )
        info = from_proto(request.image.info, findings.ImageInfo)
        anatomy = findings_from_proto(request.anatomy) if request.HasField("anatomy") else None
        work = partial(
            self.respond,
            rgb,
            info,
            anatomy,
            list(dict.fromkeys(request.overlays)),
            [MASK_LAYERS[layer] for layer in dict.fromkeys(request.masks)],
        )
        return await asyncio.get_running_loop().run_in_executor(self.executor, work)

    def respond(
        self,
        rgb: np.ndarray,
        info: findings.ImageInfo,
        anatomy: findings.Findings | None,
        overlay_layers: list[str],
        mask_types: list[findings.LesionType],
    ) -> lesion_pb2.DetectResponse:
        """Detection, then the requested overlays and masks (in the received image's pixels)."""
        drawn = [t for layer in overlay_layers for t in layer_types(layer)]
        needed = tuple(dict.fromkeys([*mask_types, *drawn]))
        result = detect(self.detector, rgb, info, anatomy, needed, self.max_per_type)
        return lesion_pb2.DetectResponse(
            lesions=[to_proto(lesion, findings_pb2.Lesion) for lesion in result.lesions],
            counts=[to_proto(count, findings_pb2.LesionCount) for count in result.counts],
            assessment=to_proto(result.assessment, findings_pb2.Assessment),
            masks=[
                lesion_pb2.LesionMask(type=to_proto_type(t), png=mask_png(result.masks[t]))
                for t in mask_types
                if t in result.masks  # a type the model does not report has no mask
            ],
            overlays=[
                common_pb2.Overlay(
                    layer=layer, png=render(rgb, result.masks, result.instances, layer)
                )
                for layer in overlay_layers
            ],
            models=[to_proto(m, findings_pb2.ModelVersion) for m in model_versions(self.detector)],
            timings_ms={k: round(v, 1) for k, v in result.timings_ms.items()},
        )

    async def ListModels(
        self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListModelsResponse:
        return common_pb2.ListModelsResponse(
            service=SERVICE_NAME, models=[model_card(m) for m in self.detector.manifests]
        )


def to_proto_type(lesion_type: findings.LesionType) -> int:
    return findings_pb2.LesionType.Value(f"LESION_TYPE_{lesion_type.name}")


def main() -> None:
    settings = LesionSettings()
    # Refuses to start on missing weights or a checksum mismatch (ModelIntegrityError).
    detector = LesionDetector.load(
        settings.weights,
        precision=settings.precision,
        test_time_scales=settings.test_time_scales,
    )
    export_model_info("lesion", detector.manifests)

    def register(server: grpc.aio.Server) -> Sequence[str]:
        servicer = LesionServicer(detector, settings)
        lesion_pb2_grpc.add_LesionServiceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    grpc_server.run(settings, "lesion", register)
