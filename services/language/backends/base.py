"""What the chat engine needs from a generation backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image


@dataclass(frozen=True)
class Generation:
    """One answer to generate: OpenAI-style messages (the image as an `{"type": "image"}`
    part of the first user turn), the image itself, and the sampling options."""

    messages: list[dict[str, Any]]
    image: Image.Image | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    chat_template: str | None  # None: the checkpoint's own


@dataclass(frozen=True)
class Delta:
    """New text; the last delta of a generation carries the token counts."""

    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class ChatBackend(Protocol):
    name: str  # "vllm" or "transformers"
    max_concurrency: int  # generations it runs at once

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def measure(self, generation: Generation) -> tuple[int, int]:
        """(the prompt's tokens, image included; the model's context length in tokens)."""
        ...

    def generate(self, generation: Generation) -> AsyncIterator[Delta]:
        """Stream the answer; closing the iterator stops the generation."""
        ...
