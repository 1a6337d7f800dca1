"""transformers backend: `generate` in-process, the fallback where vLLM is not installed.

One generation at a time (a second would only halve the speed of both on a CPU); the chat
engine queues the rest. Text streams through a `TextIteratorStreamer`; closing the stream sets
an event that a stopping criterion reads, so a cancelled call stops generating.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoProcessor,
    LlavaForConditionalGeneration,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from services.language.backends.base import Delta, Generation


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self._event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **_: Any) -> bool:
        return self._event.is_set()


class TransformersBackend:
    name = "transformers"
    max_concurrency = 1

    def __init__(self, model_dir: Path, device: str) -> None:
        self._model_dir = model_dir
        self._device = device
        self._model: LlavaForConditionalGeneration | None = None
        self._processor: Any = None

    async def start(self) -> None:
        self._model, self._processor = await asyncio.to_thread(self._load)

    def _load(self) -> tuple[LlavaForConditionalGeneration, Any]:
        dtype = torch.bfloat16 if self._device.startswith("cuda") else torch.float32
        model = LlavaForConditionalGeneration.from_pretrained(self._model_dir, dtype=dtype)
        return model.to(self._device).eval(), AutoProcessor.from_pretrained(self._model_dir)

    async def close(self) -> None:
        self._model = None

    def _inputs(self, generation: Generation) -> Any:
        prompt = self._processor.apply_chat_template(
            generation.messages,
            chat_template=generation.chat_template,
            add_generation_prompt=True,
        )
        images = [generation.image] if generation.image is not None else None
        # The template wrote any special tokens itself (as vLLM renders it): add none.
        return self._processor(
            images=images, text=prompt, add_special_tokens=False, return_tensors="pt"
        ).to(self._device)

    async def measure(self, generation: Generation) -> tuple[int, int]:
        assert self._model is not None, "start() first"
        inputs = await asyncio.to_thread(self._inputs, generation)
        context = self._model.config.text_config.max_position_embeddings
        return int(inputs["input_ids"].shape[1]), int(context)

    async def generate(self, generation: Generation) -> AsyncIterator[Delta]:
        assert self._model is not None, "start() first"
        inputs = await asyncio.to_thread(self._inputs, generation)
        streamer = TextIteratorStreamer(
            self._processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600
        )
        cancelled = threading.Event()
        sampling = generation.temperature > 0
        if generation.seed is not None:
            torch.manual_seed(generation.seed)
        outputs: list[torch.Tensor] = []

        def run() -> None:
            with torch.inference_mode():
                outputs.append(
                    self._model.generate(  # type: ignore[union-attr]
                        **inputs,
                        max_new_tokens=generation.max_tokens,
                        do_sample=sampling,
                        temperature=generation.temperature if sampling else None,
                        top_p=generation.top_p if sampling else None,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_Cancelled(cancelled)]),
                    )
                )

        worker = asyncio.create_task(asyncio.to_thread(run))
        try:
            pieces = iter(streamer)
            while (text := await asyncio.to_thread(next, pieces, None)) is not None:
                if text:
                    yield Delta(text)
            await worker
        finally:
            cancelled.set()
            if not worker.done():
                await asyncio.shield(worker)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        yield Delta("", prompt_tokens, int(outputs[0].shape[1]) - prompt_tokens)
