"""OpenAI's chat completions over the grounded chat: messages in, completion objects out."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from protos.retinal.v1 import language_pb2
from services.gateway.chat.protocol import (
    MAX_MESSAGE_CHARS,
    MAX_MESSAGES,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    ChunkDelta,
    CompletionChoice,
    CompletionMessage,
    CompletionUsage,
    FinishReason,
    ImagePart,
    TextPart,
)
from services.gateway.chat.serving import Conversation, grounding_report, invalid


def conversation(body: ChatCompletionRequest) -> tuple[Conversation, str | None]:
    """The turns and options of a request, and the one image its messages carry (a URL).

    System and developer messages are left out (the assistant's instructions are its own),
    and so are turns with no text (an image sent alone)."""
    turns: list[tuple[str, str]] = []
    images: list[str] = []
    for message in body.messages:
        if message.role in ("system", "developer"):
            continue
        if isinstance(message.content, str):
            text = message.content
        else:
            parts = message.content
            text = "\n".join(part.text for part in parts if isinstance(part, TextPart))
            images += [part.image_url.url for part in parts if isinstance(part, ImagePart)]
        if len(text) > MAX_MESSAGE_CHARS:
            raise invalid(f"a message is longer than {MAX_MESSAGE_CHARS} characters")
        if text.strip():
            turns.append((message.role, text))
    if len(set(images)) > 1:
        raise invalid("one photograph per conversation: the messages carry several images")
    if not turns or turns[-1][0] != "user":
        raise invalid("the conversation must end with a user message that has text")
    if len(turns) > MAX_MESSAGES:
        raise invalid(f"at most {MAX_MESSAGES} user and assistant messages")
    asked = Conversation(
        turns=turns,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
    )
    return asked, images[0] if images else None


def _finish_reason(reply: language_pb2.ChatResponse, asked: Conversation) -> FinishReason:
    spent = asked.max_tokens is not None and reply.usage.completion_tokens >= asked.max_tokens
    return "length" if spent else "stop"


def _usage(reply: language_pb2.ChatResponse) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=reply.usage.prompt_tokens,
        completion_tokens=reply.usage.completion_tokens,
        total_tokens=reply.usage.prompt_tokens + reply.usage.completion_tokens,
    )


def completion(
    reply: language_pb2.ChatResponse, asked: Conversation, analysis_id: str
) -> ChatCompletion:
    return ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=reply.model,
        choices=[
            CompletionChoice(
                index=0,
                message=CompletionMessage(content=reply.answer),
                finish_reason=_finish_reason(reply, asked),
            )
        ],
        usage=_usage(reply),
        retinal_grounding=grounding_report(reply.grounding),
        retinal_analysis_id=analysis_id,
    )


@dataclass
class CompletionStream:
    """The chunks of one streamed completion: the role first, a chunk per grounded sentence,
    then the finish reason with the grounding report (and the usage, when asked for)."""

    model: str
    asked: Conversation
    analysis_id: str
    include_usage: bool
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def _chunk(self, choices: list[ChunkChoice], **extra: object) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, **extra
        )

    async def chunks(
        self, answer: AsyncIterator[language_pb2.ChatChunk]
    ) -> AsyncIterator[ChatCompletionChunk]:
        yield self._chunk([ChunkChoice(index=0, delta=ChunkDelta(role="assistant", content=""))])
        async for piece in answer:
            if piece.HasField("final"):
                reply = piece.final
                finish = _finish_reason(reply, self.asked)
                yield self._chunk(
                    [ChunkChoice(index=0, delta=ChunkDelta(), finish_reason=finish)],
                    retinal_grounding=grounding_report(reply.grounding),
                    retinal_analysis_id=self.analysis_id,
                )
                if self.include_usage:
                    yield self._chunk([], usage=_usage(reply))
            elif piece.delta:
                yield self._chunk([ChunkChoice(index=0, delta=ChunkDelta(content=piece.delta))])
