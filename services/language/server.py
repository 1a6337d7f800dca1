"""The language service's gRPC surface: RetinalGPT chat grounded in the image's findings."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from protos.retinal.v1 import common_pb2, language_pb2, language_pb2_grpc
from services.language.backends.base import ChatBackend
from services.language.chat import Busy, ChatEngine
from services.language.prompting import PromptFamily
from services.language.settings import LanguageSettings
from shared import grpc_server, pixels
from shared.model_cards import export_model_info, model_card

SERVICE_NAME = language_pb2.DESCRIPTOR.services_by_name["LanguageService"].full_name
MANIFEST = "retinal_model.json"
logger = logging.getLogger(__name__)


def validate_chat_request(request: language_pb2.ChatRequest, settings: LanguageSettings) -> None:
    """Raise ValueError when the request cannot be answered whatever the model."""
    if request.HasField("image"):
        pixels.from_message(request.image)
    if not request.conversation:
        raise ValueError("the conversation is empty")
    if len(request.conversation) > settings.max_conversation_turns:
        raise ValueError(f"the conversation has more than {settings.max_conversation_turns} turns")
    for turn in request.conversation:
        if turn.role not in (language_pb2.ROLE_USER, language_pb2.ROLE_ASSISTANT):
            raise ValueError("every turn needs the role user or assistant")
        if len(turn.text) > settings.max_turn_chars:
            raise ValueError(f"a turn is longer than {settings.max_turn_chars} characters")
    if request.conversation[-1].role != language_pb2.ROLE_USER:
        raise ValueError("the conversation must end with a user turn")


def read_manifest(model_dir: Path) -> dict[str, Any]:
    path = model_dir / MANIFEST
    if path.is_file():
        return dict(json.loads(path.read_text()))
    return {
        "name": model_dir.name,
        "version": "unknown",
        "sha256": "",
        "task": "vision-language chat",
    }


def make_backend(settings: LanguageSettings, served_name: str) -> ChatBackend:
    """vLLM when a server is configured or its command is installed, else transformers."""
    use_vllm = settings.backend == "vllm" or (
        settings.backend == "auto"
        and (settings.vllm_url or shutil.which(settings.vllm_python) is not None)
    )
    if use_vllm:
        from services.language.backends.vllm_server import VllmServerBackend

        return VllmServerBackend(
            model_dir=settings.model_dir.resolve(),
            served_name=served_name,
            python=settings.vllm_python,
            url=settings.vllm_url,
            extra_args=settings.vllm_args,
            max_concurrency=settings.max_concurrency,
            startup_timeout_s=settings.vllm_startup_timeout_s,
            env={"VLLM_CPU_KVCACHE_SPACE": str(settings.vllm_cpu_kvcache_gib)},
        )
    # Imported here: torch and transformers load only where this backend serves.
    from services.language.backends.transformers_local import TransformersBackend

    return TransformersBackend(settings.model_dir, settings.transformers_device)


class LanguageServicer(language_pb2_grpc.LanguageServiceServicer):
    def __init__(self, settings: LanguageSettings) -> None:
        self._settings = settings
        self._manifest = read_manifest(settings.model_dir)
        family = settings.prompt_family or PromptFamily(
            self._manifest.get("prompt_family", PromptFamily.CHAT)
        )
        backend = make_backend(settings, self._manifest["name"])
        self.engine = ChatEngine(
            backend,
            model_name=self._manifest["name"],
            family=family,
            max_queue=settings.max_queue,
            default_max_tokens=settings.default_max_tokens,
        )
        self._ready = False

    async def start(self) -> None:
        if not self._settings.model_dir.is_dir():
            raise FileNotFoundError(
                f"no model at {self._settings.model_dir}: run `make setup` (it assembles "
                "RetinalGPT-mini) or set RETINAL_LANGUAGE_MODEL_DIR"
            )
        await self.engine.backend.start()
        export_model_info("language", [self._manifest])
        logger.info(
            "model loaded",
            extra={"model": self._manifest["name"], "backend": self.engine.backend.name},
        )
        self._ready = True

    async def close(self) -> None:
        self._ready = False
        await self.engine.backend.close()

    async def Chat(
        self, request: language_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> language_pb2.ChatResponse:
        final = language_pb2.ChatResponse()
        async for chunk in self.ChatStream(request, context):
            if chunk.HasField("final"):
                final = chunk.final
        return final

    async def ChatStream(
        self, request: language_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[language_pb2.ChatChunk]:
        try:
            validate_chat_request(request, self._settings)
            turn = self.engine.prepare(request)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not self._ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the language model is loading")
        try:
            await self.engine.fit(turn)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        started = time.perf_counter()
        try:
            async for text in self.engine.stream(turn):
                yield language_pb2.ChatChunk(delta=text)
        except Busy:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy: try again later")
        total_ms = (time.perf_counter() - started) * 1000
        response = self.engine.response(turn, total_ms)
        logger.info(
            "answered",
            extra={
                "prompt_tokens": response.usage.prompt_tokens,
                "completion_tokens": response.usage.completion_tokens,
                "unmatched": response.grounding.unmatched,
                "total_ms": round(total_ms, 1),
            },
        )
        yield language_pb2.ChatChunk(final=response)

    async def ListModels(
        self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListModelsResponse:
        return common_pb2.ListModelsResponse(
            service=SERVICE_NAME, models=[model_card(self._manifest)]
        )


def main() -> None:
    settings = LanguageSettings()
    servicer = LanguageServicer(settings)

    def register(server: grpc.aio.Server) -> Sequence[str]:
        language_pb2_grpc.add_LanguageServiceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    grpc_server.run(settings, "language", register, servicer)
