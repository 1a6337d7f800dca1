"""The lesion service's gRPC surface: MA, HE, EX, SE detection and the screening assessment."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from protos.retinal.v1 import common_pb2, lesion_pb2, lesion_pb2_grpc
from services.lesion.settings import LesionSettings
from shared import grpc_server, pixels

SERVICE_NAME = lesion_pb2.DESCRIPTOR.services_by_name["LesionService"].full_name


class LesionServicer(lesion_pb2_grpc.LesionServiceServicer):
    async def Detect(
        self, request: lesion_pb2.DetectRequest, context: grpc.aio.ServicerContext
    ) -> lesion_pb2.DetectResponse:
        try:
            pixels.from_message(request.image)
        except pixels.InvalidImageMessage as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "lesion detection models are not installed"
        )

    async def ListModels(
        self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListModelsResponse:
        return common_pb2.ListModelsResponse(service=SERVICE_NAME)


def register(server: grpc.aio.Server) -> Sequence[str]:
    lesion_pb2_grpc.add_LesionServiceServicer_to_server(LesionServicer(), server)
    return [SERVICE_NAME]


def main() -> None:
    grpc_server.run(LesionSettings(), "lesion", register)
