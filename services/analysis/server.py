"""The analysis service's gRPC surface: quality, vessels, A/V, disc/cup, fovea, features."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from protos.retinal.v1 import analysis_pb2, analysis_pb2_grpc, common_pb2
from services.analysis.settings import AnalysisSettings
from shared import grpc_server, pixels

SERVICE_NAME = analysis_pb2.DESCRIPTOR.services_by_name["AnalysisService"].full_name


class AnalysisServicer(analysis_pb2_grpc.AnalysisServiceServicer):
    async def Analyze(
        self, request: analysis_pb2.AnalyzeRequest, context: grpc.aio.ServicerContext
    ) -> analysis_pb2.AnalyzeResponse:
        try:
            pixels.from_message(request.image)
        except pixels.InvalidImageMessage as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        # No trained segmentation models are installed in this build: say so, never guess.
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "quantitative analysis models are not installed"
        )

    async def ListModels(
        self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListModelsResponse:
        return common_pb2.ListModelsResponse(service=SERVICE_NAME)


def register(server: grpc.aio.Server) -> Sequence[str]:
    analysis_pb2_grpc.add_AnalysisServiceServicer_to_server(AnalysisServicer(), server)
    return [SERVICE_NAME]


def main() -> None:
    grpc_server.run(AnalysisSettings(), "analysis", register)
