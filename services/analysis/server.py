"""The analysis service's gRPC surface: quality, vessels, A/V, disc/cup, fovea, features."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from protos.retinal.v1 import analysis_pb2, analysis_pb2_grpc, common_pb2
from services.analysis.engine.analyzer import Analyzer
from services.analysis.engine.overlays import LAYERS, render
from services.analysis.settings import AnalysisSettings
from shared import findings, grpc_server, pixels
from shared.convert import findings_to_proto, from_proto
from shared.model_cards import export_model_info, model_card

SERVICE_NAME = analysis_pb2.DESCRIPTOR.services_by_name["AnalysisService"].full_name


class AnalysisServicer(analysis_pb2_grpc.AnalysisServiceServicer):
    def __init__(self, analyzer: Analyzer, concurrent_analyses: int) -> None:
        self.analyzer = analyzer
        # CPU-bound work off the event loop, so health checks answer while an image runs.
        self.executor = ThreadPoolExecutor(concurrent_analyses, thread_name_prefix="analysis")

    async def Analyze(
        self, request: analysis_pb2.AnalyzeRequest, context: grpc.aio.ServicerContext
    ) -> analysis_pb2.AnalyzeResponse:
        try:
            rgb = pixels.from_message(request.image)
        except pixels.InvalidImageMessage as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        unknown = sorted(set(request.overlays) - set(LAYERS))
        if unknown:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown overlay layers {unknown}; known: {', '.join(LAYERS)}",
            )
        info = from_proto(request.image.info, findings.ImageInfo)
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self.executor, self.analyzer.analyze, rgb, info)
        overlays = [
            common_pb2.Overlay(layer=layer, png=render(result.overlay, layer))
            for layer in dict.fromkeys(request.overlays)
            if result.overlay is not None
        ]
        return analysis_pb2.AnalyzeResponse(
            findings=findings_to_proto(result.findings), overlays=overlays
        )

    async def ListModels(
        self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListModelsResponse:
        return common_pb2.ListModelsResponse(
            service=SERVICE_NAME,
            models=[model_card(manifest) for manifest in self.analyzer.manifests],
        )


def main() -> None:
    settings = AnalysisSettings()
    analyzer = Analyzer.load(
        settings.weights_dir,
        vessel_mirror_average=settings.vessel_mirror_average,
        vessel_precision=settings.vessel_precision,
    )
    export_model_info("analysis", analyzer.manifests)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)

    def register(server: grpc.aio.Server) -> Sequence[str]:
        servicer = AnalysisServicer(analyzer, settings.concurrent_analyses)
        analysis_pb2_grpc.add_AnalysisServiceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    grpc_server.run(settings, "analysis", register)
