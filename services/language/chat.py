"""One conversation turn: admission, prompt, generation, grounding, usage.

Text is streamed a sentence at a time, each sentence grounded before it leaves the service,
so that a streamed answer never shows an unmeasured number even for a moment (the cost: the
first words arrive at the end of the first sentence rather than at the first token).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from prometheus_client import Counter, Gauge, Histogram

from protos.retinal.v1 import language_pb2
from services.language.backends.base import ChatBackend, Delta, Generation
from services.language.facts import facts_from_findings
from services.language.grounding import GroundingChecker, GroundingResult
from services.language.prompting import (
    RETINALGPT_V0_TEMPLATE,
    PromptFamily,
    build_messages,
    describe,
    stated_texts,
)
from shared import pixels
from shared.convert import findings_from_proto

TOKENS = Counter("retinal_language_tokens_total", "Tokens processed", ["backend", "kind"])
QUEUE_DEPTH = Gauge("retinal_language_queue_depth", "Conversations waiting for the model")
ACTIVE = Gauge("retinal_language_active_generations", "Conversations being generated")
FIRST_TOKEN = Histogram(
    "retinal_language_time_to_first_token_seconds",
    "From admission (queueing included) to the model's first token",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
UNGROUNDED = Counter("retinal_language_unmeasured_values_total", "Values repaired in answers")

_BOUNDARY = re.compile(r"(?<=[.!?;:])\s+|\n")
# A run-on sentence is released at a clause (else a word) once this long, so a stream never
# stalls on a model that forgets full stops; grounding then sees that piece alone.
_LONGEST_PENDING = 240
_SPACE = re.compile(r"\s+")
# The fewest answer tokens worth generating: a prompt leaving less room is refused.
MIN_ANSWER_TOKENS = 16
_ROLES = {language_pb2.ROLE_USER: "user", language_pb2.ROLE_ASSISTANT: "assistant"}


class Busy(Exception):
    """Every generation slot and every queue place is taken."""


@dataclass
class _Turn:
    checker: GroundingChecker
    generation: Generation
    grounding: GroundingResult = field(default_factory=lambda: GroundingResult(answer=""))
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_ms: float = 0.0


def _options(request: language_pb2.ChatRequest, default_max_tokens: int) -> dict[str, float]:
    options = request.options
    max_tokens = options.max_tokens if options.HasField("max_tokens") else default_max_tokens
    temperature = options.temperature if options.HasField("temperature") else 0.0
    top_p = options.top_p if options.HasField("top_p") else 1.0
    if not 1 <= max_tokens <= 4096:
        raise ValueError("max_tokens must be between 1 and 4096")
    if not 0.0 <= temperature <= 2.0:
        raise ValueError("temperature must be between 0 and 2")
    if not 0.0 < top_p <= 1.0:
        raise ValueError("top_p must be in (0, 1]")
    return {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}


def _release_point(pending: str) -> int:
    """How much of the pending text can be grounded and sent now (0: wait for more)."""
    boundaries = list(_BOUNDARY.finditer(pending))
    if boundaries:
        return boundaries[-1].end()
    if len(pending) < _LONGEST_PENDING:
        return 0
    spaces = list(_SPACE.finditer(pending))
    after_comma = [m for m in spaces if pending[: m.start()].endswith(",")]
    chosen = after_comma or spaces
    return chosen[-1].end() if chosen else len(pending)


class ChatEngine:
    def __init__(
        self,
        backend: ChatBackend,
        model_name: str,
        family: PromptFamily,
        max_queue: int,
        default_max_tokens: int,
    ) -> None:
        self.backend = backend
        self.model_name = model_name
        self._template = RETINALGPT_V0_TEMPLATE if family is PromptFamily.RETINALGPT_V0 else None
        self._slots = asyncio.Semaphore(backend.max_concurrency)
        self._max_queue = max_queue
        self._waiting = 0
        self._default_max_tokens = default_max_tokens

    def prepare(self, request: language_pb2.ChatRequest) -> _Turn:
        """Everything a turn needs before the model runs; ValueError for a bad request."""
        options = _options(request, self._default_max_tokens)
        findings = findings_from_proto(request.findings)
        facts, boxes = facts_from_findings(findings)
        image = (
            Image.fromarray(np.array(pixels.from_message(request.image)))
            if request.HasField("image")
            else None
        )
        conversation = [(_ROLES[turn.role], turn.text) for turn in request.conversation]
        messages = build_messages(describe(findings, facts, boxes), conversation, image is not None)
        generation = Generation(
            messages=messages,
            image=image,
            max_tokens=int(options["max_tokens"]),
            temperature=options["temperature"],
            top_p=options["top_p"],
            seed=request.options.seed if request.options.HasField("seed") else None,
            chat_template=self._template,
        )
        return _Turn(GroundingChecker(facts, boxes, stated_texts(findings)), generation)

    async def fit(self, turn: _Turn) -> None:
        """Fit the answer into the model's context: max_tokens is cut to what the context has
        left; ValueError when the prompt leaves no room (a conversation over the context would
        otherwise fail late, or on a CPU keep the model busy for minutes on a doomed prompt)."""
        prompt_tokens, context = await self.backend.measure(turn.generation)
        room = context - prompt_tokens
        if room < MIN_ANSWER_TOKENS:
            raise ValueError(
                f"the conversation and findings are {prompt_tokens} tokens; the model's context "
                f"is {context}, leaving no room for an answer: shorten the conversation"
            )
        max_tokens = min(turn.generation.max_tokens, room)
        turn.generation = dataclasses.replace(turn.generation, max_tokens=max_tokens)

    async def stream(self, turn: _Turn) -> AsyncIterator[str]:
        """Grounded text, a sentence at a time; `turn` holds the report and usage after."""
        if self._slots.locked() and self._waiting >= self._max_queue:
            raise Busy
        admitted = time.perf_counter()
        self._waiting += 1
        QUEUE_DEPTH.inc()
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
            QUEUE_DEPTH.dec()
        ACTIVE.inc()
        try:
            async for text in self._generate(turn, admitted):
                yield text
        finally:
            ACTIVE.dec()
            self._slots.release()

    async def _generate(self, turn: _Turn, admitted: float) -> AsyncIterator[str]:
        pending = ""
        deltas: AsyncIterator[Delta] = self.backend.generate(turn.generation)
        try:
            async for delta in deltas:
                if delta.prompt_tokens is not None:
                    turn.prompt_tokens = delta.prompt_tokens
                    turn.completion_tokens = delta.completion_tokens or 0
                if not delta.text:
                    continue
                if not turn.first_token_ms:
                    turn.first_token_ms = (time.perf_counter() - admitted) * 1000
                    FIRST_TOKEN.observe(turn.first_token_ms / 1000)
                pending += delta.text
                cut = _release_point(pending)
                if cut:
                    yield self._ground(turn, pending[:cut])
                    pending = pending[cut:]
        finally:
            await deltas.aclose()  # type: ignore[attr-defined]
        if pending:
            yield self._ground(turn, pending)
        TOKENS.labels(self.backend.name, "prompt").inc(turn.prompt_tokens)
        TOKENS.labels(self.backend.name, "completion").inc(turn.completion_tokens)

    @staticmethod
    def _ground(turn: _Turn, text: str) -> str:
        checked = turn.checker.check(text)
        turn.grounding.answer += checked.answer
        turn.grounding.values.extend(checked.values)
        UNGROUNDED.inc(checked.unmatched)
        return checked.answer

    def response(self, turn: _Turn, total_ms: float) -> language_pb2.ChatResponse:
        grounding = turn.grounding
        return language_pb2.ChatResponse(
            answer=grounding.answer.strip(),
            findings_keys=grounding.findings_keys,
            grounding=language_pb2.GroundingReport(
                values=[
                    language_pb2.GroundedValue(
                        text=v.text, measured=v.measured, findings_key=v.findings_key
                    )
                    for v in grounding.values
                ],
                unmatched=grounding.unmatched,
                repaired=grounding.repaired,
            ),
            usage=language_pb2.Usage(
                prompt_tokens=turn.prompt_tokens,
                completion_tokens=turn.completion_tokens,
                time_to_first_token_ms=turn.first_token_ms,
                total_ms=total_ms,
            ),
            model=self.model_name,
        )
