"""The language service's gRPC surface: RetinalGPT chat grounded in the image's findings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc

from protos.retinal.v1 import common_pb2, language_pb2, language_pb2_grpc
from services.language.settings import LanguageSettings
from shared import grpc_server, pixels

SERVICE_NAME = language_pb2.DESCRIPTOR.services_by_name["LanguageService"].full_name


def validate_chat_request(request: language_pb2.ChatRequest) -> None:
    """Raise ValueError when the request cannot be answered whatever the model."""
    if request.HasField("image"):
        pixels.from_message(request.image)
    if not request.conversation:
        raise ValueError("the conversation is empty")
    if request.conversation[-1].role != language_pb2.ROLE_USER:
        raise ValueError("the conversation must end with a user turn")


class LanguageServicer(language_pb2_grpc.LanguageServiceServicer):
    async def Chat(
        self, request: language_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> language_pb2.ChatResponse:
        await self._refuse(request, context)
        return language_pb2.ChatResponse()

    async def ChatStream(
        self, request: language_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[language_pb2.ChatChunk]:
        await self._refuse(request, context)
        yield language_pb2.ChatChunk()

    async def ListModels(
        self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListModelsResponse:
        return common_pb2.ListModelsResponse(service=SERVICE_NAME)

    @staticmethod
    async def _refuse(request: language_pb2.ChatRequest, context: grpc.aio.ServicerContext) -> None:
        try:
            validate_chat_request(request)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no language model is installed")


def register(server: grpc.aio.Server) -> Sequence[str]:
    language_pb2_grpc.add_LanguageServiceServicer_to_server(LanguageServicer(), server)
    return [SERVICE_NAME]


def main() -> None:
    grpc_server.run(LanguageSettings(), "language", register)
