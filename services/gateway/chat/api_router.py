"""HTTP surface of the assistant: /v1/chat (grounded answers, optionally as server-sent
events) and /v1/chat/completions (OpenAI's chat completions API)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Message

from services.gateway.chat import compat
from services.gateway.chat.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ChatDelta,
    ChatRequest,
    ChatResponse,
)
from services.gateway.chat.serving import (
    Conversation,
    answer,
    chat_response,
    invalid,
    language_request,
    open_stream,
    photograph,
)
from services.gateway.problems import (
    PROBLEM_RESPONSES,
    Problem,
    from_backend_error,
    problem_details,
)
from services.gateway.rate_limits import ChatTenant
from shared.pipeline import BackendError


class CappedBodyRoute(APIRoute):
    """Reads the request body under GatewaySettings.chat_max_body_bytes (413 past it) before
    FastAPI parses it: a JSON body is held in memory whole, base64 image included."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        parse_and_run = super().get_route_handler()

        async def capped(request: Request) -> Response:
            limit: int = request.app.state.settings.chat_max_body_bytes
            declared = request.headers.get("content-length", "")
            body = bytearray()
            if not (declared.isdigit() and int(declared) > limit):
                async for piece in request.stream():
                    body += piece
                    if len(body) > limit:
                        break
            if len(body) > limit or (declared.isdigit() and int(declared) > limit):
                raise Problem(
                    413,
                    "too_large_bytes",
                    "The request is too large",
                    f"a chat request is at most {limit // (1024 * 1024)} MiB",
                )
            replayed = False
            downstream = request.receive

            async def receive() -> Message:
                # The body once, then the connection's own messages (its disconnect).
                nonlocal replayed
                if replayed:
                    return await downstream()
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}

            return await parse_and_run(Request(request.scope, receive))

        return capped


router = APIRouter(prefix="/v1", tags=["chat"], route_class=CappedBodyRoute)

_SSE = {"text/event-stream": {"schema": {"type": "string"}}}


@router.post(
    "/chat",
    response_model=ChatResponse,
    responses={200: {"content": _SSE}, **PROBLEM_RESPONSES},
)
async def chat(request: Request, tenant: ChatTenant, body: ChatRequest) -> Response | ChatResponse:
    """Ask the assistant about one photograph; every number in its answer is a measured one.

    With `stream: true` the answer comes as server-sent events: `delta` ({"text"}: the next
    grounded sentence), then `done` (this endpoint's JSON answer) or `error` (problem details).
    """
    stored, png = await photograph(
        request, tenant, body.analysis_id, body.image, body.pixel_size_um
    )
    asked = Conversation(
        turns=[(m.role, m.content) for m in body.messages],
        max_tokens=body.max_tokens,
        temperature=body.temperature,
    )
    message = await asyncio.to_thread(language_request, stored, png, asked)
    if not body.stream:
        return chat_response(await answer(request, message), stored.id)
    chunks = await open_stream(request, message)

    async def events() -> AsyncIterator[ServerSentEvent]:
        try:
            async for chunk in chunks:
                if chunk.HasField("final"):
                    done = chat_response(chunk.final, stored.id).model_dump_json()
                    yield ServerSentEvent(data=done, event="done")
                elif chunk.delta:
                    delta = ChatDelta(text=chunk.delta).model_dump_json()
                    yield ServerSentEvent(data=delta, event="delta")
        except BackendError as error:
            problem = problem_details(request, from_backend_error(error))
            yield ServerSentEvent(data=problem.model_dump_json(exclude_none=True), event="error")

    return EventSourceResponse(events(), sep="\n")


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={200: {"content": _SSE}, **PROBLEM_RESPONSES},
)
async def chat_completions(
    request: Request, tenant: ChatTenant, body: ChatCompletionRequest
) -> Response | ChatCompletion:
    """OpenAI's chat completions: the image (a base64 data: URL in an `image_url` part) is
    analysed first, or the extension field `analysis_id` names a stored analysis; the answer
    is grounded in the findings, and `retinal_grounding` reports how."""
    asked, image = compat.conversation(body)
    if (image is None) == (body.analysis_id is None):
        raise invalid("send one image (a data: URL) in the messages, or an analysis_id")
    stored, png = await photograph(request, tenant, body.analysis_id, image)
    message = await asyncio.to_thread(language_request, stored, png, asked)
    if not body.stream:
        return compat.completion(await answer(request, message), asked, stored.id)
    chunks = await open_stream(request, message)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    stream = compat.CompletionStream(body.model, asked, stored.id, include_usage)

    async def events() -> AsyncIterator[ServerSentEvent]:
        try:
            async for chunk in stream.chunks(chunks):
                yield ServerSentEvent(data=chunk.model_dump_json(exclude_none=True))
        except BackendError as error:
            # OpenAI's way to fail mid-stream: an `error` object where a chunk would be.
            problem = from_backend_error(error)
            failure = {"message": problem.title, "type": problem.code, "code": problem.code}
            yield ServerSentEvent(data=json.dumps({"error": failure}))
            return
        yield ServerSentEvent(data="[DONE]")

    return EventSourceResponse(events(), sep="\n")
