"""The logic behind the chat endpoints: a stored analysis (or an image analysed first), its
findings and chat image to the language service with the conversation, the grounded answer
back, whole or streamed.

Conversations and images are the tenant's data: nothing here logs them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from fastapi import Request
from PIL import Image

from protos.retinal.v1 import language_pb2
from services.gateway.analyses.api_router import not_found
from services.gateway.analyses.serving import analyze_upload
from services.gateway.chat.protocol import (
    ChatResponse,
    ChatUsage,
    GroundedValue,
    GroundingReport,
)
from services.gateway.problems import Problem
from services.gateway.store import StoredAnalysis
from shared import findings, pixels
from shared.convert import findings_to_proto
from shared.pipeline import BackendError
from shared.telemetry import outgoing_metadata

logger = logging.getLogger(__name__)

_ROLES = {"user": language_pb2.ROLE_USER, "assistant": language_pb2.ROLE_ASSISTANT}


def invalid(detail: str) -> Problem:
    return Problem(422, "validation-error", "The request is not valid", detail)


@dataclass(frozen=True)
class Conversation:
    """What the language service is asked: turns (role, text) ending with the user's, and
    the generation options the caller set."""

    turns: Sequence[tuple[str, str]]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None


def decode_image(value: str) -> bytes:
    """The bytes of a base64 image or of a base64 data: URL (no URL is ever fetched)."""
    if value.startswith(("http://", "https://")):
        raise invalid("image URLs are not fetched: send the image as a base64 data: URL")
    if value.startswith("data:"):
        header, comma, value = value.partition(",")
        if not comma or not header.endswith(";base64"):
            raise invalid("an image data: URL must be base64 (data:image/png;base64,...)")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("the image is not valid base64") from None


async def photograph(
    request: Request,
    tenant: str,
    analysis_id: str | None,
    image: str | None,
    pixel_size_um: float | None = None,
) -> tuple[StoredAnalysis, bytes | None]:
    """The analysis the answer is grounded in, and its chat image (PNG) when one is kept.

    An image is analysed first, exactly as POST /v1/analyses does (ingestion, the backends,
    the store; the same image by the same models is the stored result), and counts against
    the tenant's analyses budget.
    """
    state = request.app.state
    if image is not None:
        data = decode_image(image)
        if len(data) > state.settings.max_upload_bytes:
            raise Problem(
                413,
                "too_large_bytes",
                "The image was refused",
                f"the image exceeds {state.settings.max_upload_mb} MiB",
            )
        state.rate_limits.take(tenant, "analyses")
        analysed = await analyze_upload(
            data,
            tenant=tenant,
            request_id=request.state.request_id,
            pixel_size_um=pixel_size_um,
            overlays=(),
            limits=state.ingest_limits,
            backends=state.backends.pipeline,
            store=state.store,
        )
        analysis_id = analysed.id
    if analysis_id is None:
        raise invalid("give an image or an analysis_id")
    stored = await asyncio.to_thread(state.store.get_analysis, tenant, analysis_id)
    if stored is None:
        raise not_found(analysis_id)
    png = await asyncio.to_thread(state.store.get_chat_image, tenant, analysis_id)
    return stored, png


def language_request(
    stored: StoredAnalysis, png: bytes | None, conversation: Conversation
) -> language_pb2.ChatRequest:
    """The gRPC request: findings, the chat image's pixels (when kept), turns and options."""
    options = language_pb2.GenerationOptions()
    if conversation.max_tokens is not None:
        options.max_tokens = conversation.max_tokens
    if conversation.temperature is not None:
        options.temperature = conversation.temperature
    if conversation.top_p is not None:
        options.top_p = conversation.top_p
    if conversation.seed is not None:
        options.seed = conversation.seed
    message = language_pb2.ChatRequest(
        findings=findings_to_proto(stored.findings),
        conversation=[
            language_pb2.Turn(role=_ROLES[role], text=text) for role, text in conversation.turns
        ],
        options=options,
    )
    if png is not None:
        rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        info = stored.findings.image or findings.ImageInfo()
        message.image.CopyFrom(pixels.to_message(rgb, info))
    return message


def _backend_error(error: grpc.aio.AioRpcError) -> BackendError:
    return BackendError("language", error.code(), error.details() or "")


def _call_options(request: Request) -> dict[str, object]:
    return {
        "timeout": request.app.state.settings.language_deadline_s,
        "metadata": outgoing_metadata(request.state.request_id),
    }


async def answer(request: Request, message: language_pb2.ChatRequest) -> language_pb2.ChatResponse:
    """The whole grounded answer (BackendError for the gRPC errors, mapped to problems)."""
    try:
        reply: language_pb2.ChatResponse = await request.app.state.backends.language.Chat(
            message, **_call_options(request)
        )
    except grpc.aio.AioRpcError as error:
        raise _backend_error(error) from error
    return reply


async def open_stream(
    request: Request, message: language_pb2.ChatRequest
) -> AsyncIterator[language_pb2.ChatChunk]:
    """The answer's chunks. The first is awaited here, so that a refusal (busy, invalid,
    unavailable) is still an HTTP error and not a broken stream."""
    call = request.app.state.backends.language.ChatStream(message, **_call_options(request))
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as error:
        raise _backend_error(error) from error
    return _chunks(call, first)


async def _chunks(
    call: grpc.aio.UnaryStreamCall,  # type: ignore[type-arg]
    first: language_pb2.ChatChunk,
) -> AsyncIterator[language_pb2.ChatChunk]:
    chunk = first
    ended = False
    try:
        while chunk is not grpc.aio.EOF:
            yield chunk
            chunk = await call.read()
        ended = True
    except grpc.aio.AioRpcError as error:
        ended = True
        raise _backend_error(error) from error
    finally:
        if not ended:
            # The client went away mid-answer (this generator was closed or its read
            # cancelled): stop the generation nobody reads.
            call.cancel()
            logger.info("chat stream cancelled: the client disconnected")


def grounding_report(report: language_pb2.GroundingReport) -> GroundingReport:
    return GroundingReport(
        values=[
            GroundedValue(text=v.text, measured=v.measured, findings_key=v.findings_key)
            for v in report.values
        ],
        unmatched=report.unmatched,
        repaired=report.repaired,
    )


def chat_response(reply: language_pb2.ChatResponse, analysis_id: str) -> ChatResponse:
    usage = reply.usage
    return ChatResponse(
        answer=reply.answer,
        findings_keys=list(reply.findings_keys),
        grounding=grounding_report(reply.grounding),
        usage=ChatUsage(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.prompt_tokens + usage.completion_tokens,
            time_to_first_token_ms=usage.time_to_first_token_ms,
            total_ms=usage.total_ms,
        ),
        model=reply.model,
        analysis_id=analysis_id,
    )
