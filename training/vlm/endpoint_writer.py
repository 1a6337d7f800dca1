"""Instruction conversations written by an OpenAI-compatible endpoint, cached and resumable.

LLaVA-Med's recipe with our findings: a text model reads the image's description (the same
compact findings text the assistant is prompted with) and writes a conversation about it,
returned as JSON that a schema constrains (`response_format: json_schema`; vLLM, OpenAI and
most compatible servers enforce it). Enabled by `python -m training.vlm.data --endpoint URL`.

- Cached: each request (model, instruction, description, conversation number) is hashed and
  its reply kept as `<cache>/<hash>.json`; a rerun, or a run after an interruption, sends only
  the requests whose replies are missing. Requests go out `concurrency` at a time.
- Checked: every answer is run through the language service's grounding check; a conversation
  stating any value that was not measured is refused, as is a reply that is not the schema's
  JSON. A refused or failed conversation is replaced by a template one (counted, so the stats
  say how much the endpoint really wrote).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
from pydantic import BaseModel, Field, ValidationError

from services.language.facts import facts_from_findings
from services.language.grounding import GroundingChecker
from services.language.prompting import describe, stated_texts
from shared import findings as F
from training.vlm.conversations import Turn

logger = logging.getLogger(__name__)

INSTRUCTION = (
    "You are writing training data for a retinal clinical assistant. Below are the measured "
    "findings of one colour fundus photograph. Write a conversation of {turns} questions a "
    "clinician might ask about this image and the assistant's answers. Cover image quality, "
    "disease signs, vascular measurements and lesions. Every number in an answer must be "
    "copied exactly from the findings; if something was not measured, the answer says so. "
    "Reply with JSON only.\n\nFindings:\n{description}"
)


class GeneratedTurn(BaseModel):
    question: str = Field(min_length=3, max_length=300)
    answer: str = Field(min_length=1, max_length=800)


class GeneratedConversation(BaseModel):
    turns: list[GeneratedTurn] = Field(min_length=3, max_length=6)


@dataclass(frozen=True)
class Endpoint:
    url: str  # the server's /v1 base, e.g. http://127.0.0.1:8000/v1
    model: str
    api_key: str = ""  # OpenAI's needs one; local servers mostly do not
    concurrency: int = 4
    max_tokens: int = 700
    temperature: float = 0.8


@dataclass(frozen=True)
class Request:
    image_id: str
    number: int  # which conversation of the image
    prompt: str
    checker: GroundingChecker

    def key(self, model: str) -> str:
        text = json.dumps([model, self.prompt, self.number])
        return hashlib.sha256(text.encode()).hexdigest()


class EndpointWriter:
    """Writes conversations through `endpoint`, keeping every reply under `cache`."""

    def __init__(self, endpoint: Endpoint, cache: Path) -> None:
        self.endpoint = endpoint
        self.cache = cache
        self.counts: Counter[str] = Counter()
        self._client = openai.OpenAI(
            base_url=endpoint.url,
            api_key=endpoint.api_key or os.environ.get("OPENAI_API_KEY", "unused"),
            max_retries=3,  # the client's backoff on connection errors, 429 and 5xx
            timeout=600,
        )

    @staticmethod
    def request(image_id: str, result: F.Findings, number: int, turns: int) -> Request:
        facts, boxes = facts_from_findings(result)
        prompt = INSTRUCTION.format(turns=turns, description=describe(result, facts, boxes))
        checker = GroundingChecker(facts, boxes, stated_texts(result))
        return Request(image_id, number, prompt, checker)

    def write(self, requests: list[Request]) -> list[list[Turn] | None]:
        """Each request's checked conversation, or None where the endpoint gave none."""
        with ThreadPoolExecutor(self.endpoint.concurrency) as pool:
            replies = list(pool.map(self._reply, requests))
        self.counts.update(outcome for _, outcome in replies)  # counted here, not in threads
        return [
            self._conversation(request, content)
            for request, (content, _) in zip(requests, replies, strict=True)
        ]

    def _reply(self, request: Request) -> tuple[str | None, str]:
        """The reply's content (None when the request failed) and where it came from."""
        path = self.cache / f"{request.key(self.endpoint.model)}.json"
        if path.is_file():
            return json.loads(path.read_text())["content"], "cached"
        try:
            completion = self._client.chat.completions.create(
                model=self.endpoint.model,
                messages=[{"role": "user", "content": request.prompt}],
                max_tokens=self.endpoint.max_tokens,
                temperature=self.endpoint.temperature,
                response_format={
                    "type": "json_schema",
                    "json_schema": {
                        "name": "conversation",
                        "schema": GeneratedConversation.model_json_schema(),
                    },
                },
            )
        except openai.OpenAIError as error:
            logger.warning("endpoint request failed", extra={"error": str(error)[:300]})
            return None, "failed_requests"
        content = completion.choices[0].message.content or ""
        self.cache.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".part")
        temporary.write_text(json.dumps({"image": request.image_id, "content": content}))
        temporary.replace(path)  # a reply is cached whole or not at all
        return content, "sent"

    def _conversation(self, request: Request, content: str | None) -> list[Turn] | None:
        if content is None:
            return None
        try:
            parsed = GeneratedConversation.model_validate_json(content)
        except ValidationError:
            self.counts["refused_not_json"] += 1
            return None
        if any(request.checker.check(turn.answer).unmatched for turn in parsed.turns):
            self.counts["refused_unmeasured_value"] += 1
            return None
        self.counts["accepted"] += 1
        return [Turn(t.question, t.answer, "generated") for t in parsed.turns]
