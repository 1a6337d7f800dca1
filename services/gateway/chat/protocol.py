"""Request and response models of /v1/chat and the OpenAI-compatible /v1/chat/completions."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The language service's own caps (RETINAL_LANGUAGE_MAX_CONVERSATION_TURNS, _MAX_TURN_CHARS):
# past them a request is refused here, as a 422, rather than there.
MAX_MESSAGES = 64
MAX_MESSAGE_CHARS = 8000
MAX_TOKENS = 1024
# A base64 image or data URL: the body cap (GatewaySettings.chat_max_body_bytes) bounds it.
MAX_IMAGE_CHARS = 200 * 1024 * 1024

FinishReason = Literal["stop", "length"]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)


class ChatRequest(BaseModel):
    """A question about one photograph: a stored analysis, or an image analysed first."""

    model_config = ConfigDict(extra="forbid")

    analysis_id: str | None = Field(
        default=None, max_length=64, description="An analysis of this tenant (POST /v1/analyses)"
    )
    image: str | None = Field(
        default=None,
        max_length=MAX_IMAGE_CHARS,
        description="Instead of analysis_id: the photograph, base64 or a data: URL. It is "
        "analysed first, as POST /v1/analyses does (and stored; a stored result is reused)",
    )
    pixel_size_um: float | None = Field(
        default=None, gt=0, le=100, description="With `image`: micrometres per pixel"
    )
    messages: list[ChatMessage] = Field(
        min_length=1,
        max_length=MAX_MESSAGES,
        description="The conversation so far, ending with the user's question",
    )
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    stream: bool = Field(
        default=False,
        description="Server-sent events: `delta` events ({text}), then one `done` event (the "
        "ChatResponse) or one `error` event (problem details)",
    )

    @model_validator(mode="after")
    def _one_photograph_and_a_question(self) -> ChatRequest:
        if (self.analysis_id is None) == (self.image is None):
            raise ValueError("give exactly one of analysis_id and image")
        if self.pixel_size_um is not None and self.image is None:
            raise ValueError("pixel_size_um goes with image")
        if self.messages[-1].role != "user":
            raise ValueError("the last message must be the user's")
        return self


class GroundedValue(BaseModel):
    text: str = Field(description="A number or box as the model wrote it")
    measured: bool = Field(description="False: no measurement says it (the answer was repaired)")
    findings_key: str = Field(description="The findings path it matched or was repaired to")


class GroundingReport(BaseModel):
    values: list[GroundedValue]
    unmatched: int = Field(description="Values that no measurement supports")
    repaired: bool = Field(description="True when the answer's text was corrected")


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    time_to_first_token_ms: float
    total_ms: float


class ChatResponse(BaseModel):
    answer: str = Field(description="Grounded: every number in it is a measured value")
    findings_keys: list[str] = Field(description="The findings paths the answer states")
    grounding: GroundingReport
    usage: ChatUsage
    model: str
    analysis_id: str


class ChatDelta(BaseModel):
    """The data of one `delta` event of a streamed /v1/chat: the next grounded sentence."""

    text: str


# ---- OpenAI-compatible ---------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str = Field(max_length=MAX_MESSAGE_CHARS)


class ImageUrl(BaseModel):
    url: str = Field(
        max_length=MAX_IMAGE_CHARS, description="data:image/...;base64,... (nothing is fetched)"
    )
    detail: str | None = Field(default=None, max_length=16)


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class CompletionRequestMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="system and developer messages are not forwarded: the assistant's "
        "instructions are its own"
    )
    content: (
        Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)]
        | Annotated[list[ContentPart], Field(max_length=16)]
    )
    name: str | None = Field(default=None, max_length=64)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request; the image (a data URL) is analysed first, or
    `analysis_id` names a stored analysis. Fields OpenAI has and this API has not are
    ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(
        default="retinalgpt-mini", max_length=200, description="The served model answers"
    )
    messages: list[CompletionRequestMessage] = Field(min_length=1, max_length=2 * MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    analysis_id: str | None = Field(
        default=None,
        max_length=64,
        description="Extension: answer about this stored analysis (no image in the messages)",
    )


class CompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class CompletionChoice(BaseModel):
    index: int
    message: CompletionMessage
    finish_reason: FinishReason
    logprobs: None = None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage
    retinal_grounding: GroundingReport = Field(description="Extension: the grounding report")
    retinal_analysis_id: str = Field(description="Extension: the analysis the answer is about")


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None
    retinal_grounding: GroundingReport | None = None
    retinal_analysis_id: str | None = None
