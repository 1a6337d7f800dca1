"""The gateway's assistant: /v1/chat (JSON and server-sent events) and the OpenAI-compatible
/v1/chat/completions, over a running stack with RetinalGPT-mini (transformers, one slot, no
queue: a second concurrent conversation is refused as busy)."""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.gateway.tenants import digest, new_key
from tests.conftest import REPO, Stack, fundus_png, wait_until
from tests.findings_examples import example_findings
from tests.test_gateway import _is_problem

MODEL_DIR = REPO / "var" / "models" / "retinalgpt-mini"
KEYS = {"clinic-a": new_key(), "clinic-b": new_key()}
# Appears in questions only: it must reach no log.
SECRET = "zebra-marker-4471"
QUESTION = f"Patient {SECRET}: what is the vertical cup-to-disc ratio?"
needs_model = pytest.mark.skipif(
    not MODEL_DIR.is_dir(), reason="RetinalGPT-mini not assembled (make setup)"
)


@pytest.fixture(scope="module")
def chat_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    configured = ",".join(f"{tenant}:{digest(key)}" for tenant, key in KEYS.items())
    running = Stack(
        tmp_path_factory.mktemp("chat"),
        extra_env={"RETINAL_GATEWAY_API_KEYS": configured, "RETINAL_LANGUAGE_MAX_QUEUE": "0"},
    )
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def analysis_id(chat_stack: Stack) -> str:
    reply = httpx.post(
        f"{chat_stack.url}/v1/analyses",
        files={"file": ("eye.png", fundus_png())},
        headers=_auth("clinic-a"),
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    return str(reply.json()["id"])


def _auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def _chat(stack: Stack, body: dict[str, Any], tenant: str = "clinic-a") -> httpx.Response:
    return httpx.post(f"{stack.url}/v1/chat", json=body, headers=_auth(tenant), timeout=120)


def _question(**extra: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 24,
        "temperature": 0,
        **extra,
    }


def _events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event, data) of a server-sent event stream."""
    event, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def _assert_grounded(answer: dict[str, Any]) -> None:
    grounding = answer["grounding"]
    assert grounding["unmatched"] == sum(not v["measured"] for v in grounding["values"])
    assert grounding["repaired"] == (grounding["unmatched"] > 0)
    measured_keys = {v["findings_key"] for v in grounding["values"] if v["measured"]}
    assert measured_keys <= set(answer["findings_keys"])


def _png_data_url(size: int) -> str:
    return "data:image/png;base64," + base64.b64encode(fundus_png(size)).decode()


@pytest.mark.slow
@needs_model
def test_chat_about_a_stored_analysis(chat_stack: Stack, analysis_id: str) -> None:
    reply = httpx.post(
        f"{chat_stack.url}/v1/chat",
        json=_question(analysis_id=analysis_id),
        headers={**_auth("clinic-a"), "X-Request-ID": "chat-trace-1"},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["analysis_id"] == analysis_id
    assert answer["answer"] and answer["model"]
    usage = answer["usage"]
    assert 0 < usage["completion_tokens"] <= 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    _assert_grounded(answer)
    # The request id reached the language service; the question reached no log.
    log = chat_stack.services["language"].log.splitlines()
    calls = [json.loads(line) for line in log if line.startswith("{")]
    assert any(
        (c.get("request_id"), c.get("method"), c.get("code")) == ("chat-trace-1", "Chat", "OK")
        for c in calls
    )
    assert all(SECRET not in service.log for service in chat_stack.services.values())


@pytest.mark.slow
@needs_model
def test_a_streamed_chat_sends_grounded_deltas_then_the_answer(
    chat_stack: Stack, analysis_id: str
) -> None:
    body = _question(analysis_id=analysis_id, stream=True)
    with httpx.stream(
        "POST", f"{chat_stack.url}/v1/chat", json=body, headers=_auth("clinic-a"), timeout=120
    ) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = list(_events(reply.iter_lines()))
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) <= {"delta"} and len(kinds) >= 2
    done = json.loads(events[-1][1])
    streamed = "".join(json.loads(data)["text"] for kind, data in events if kind == "delta")
    assert streamed.strip() == done["answer"]
    _assert_grounded(done)


@pytest.mark.slow
@needs_model
def test_chat_with_an_image_analyses_it_first(chat_stack: Stack) -> None:
    image = base64.b64encode(fundus_png(300)).decode()
    reply = _chat(chat_stack, _question(image=image, max_tokens=16))
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    _assert_grounded(answer)
    stored = httpx.get(
        f"{chat_stack.url}/v1/analyses/{answer['analysis_id']}", headers=_auth("clinic-a")
    )
    assert stored.status_code == 200
    assert stored.json()["findings"]["image"]["width"] == 300
    # The same image again (a data: URL this time) reuses the stored analysis.
    again = _chat(chat_stack, _question(image=_png_data_url(300), max_tokens=8))
    assert again.status_code == 200, again.text
    assert again.json()["analysis_id"] == answer["analysis_id"]


@pytest.mark.slow
@needs_model
def test_the_openai_client_gets_completions_and_chunks(chat_stack: Stack, analysis_id: str) -> None:
    import openai

    client = openai.OpenAI(
        base_url=f"{chat_stack.url}/v1", api_key=KEYS["clinic-a"], max_retries=0, timeout=120
    )
    messages: Any = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": _png_data_url(256)}},
                {"type": "text", "text": QUESTION},
            ],
        }
    ]
    completion = client.chat.completions.create(
        model="retinalgpt-mini", messages=messages, max_tokens=16, temperature=0, seed=7
    )
    assert completion.object == "chat.completion"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in {"stop", "length"}
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 16
    extra = completion.model_extra or {}
    grounding = extra["retinal_grounding"]
    assert grounding["unmatched"] == sum(not v["measured"] for v in grounding["values"])
    # The same bytes as the stored analysis's image: the stored analysis, by content.
    assert extra["retinal_analysis_id"] == analysis_id

    stream = client.chat.completions.create(
        model="retinalgpt-mini",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"analysis_id": analysis_id},
    )
    chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and text.strip()
    assert (finish[0].model_extra or {})["retinal_grounding"]["unmatched"] >= 0
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


@pytest.mark.slow
def test_another_tenants_analysis_is_not_found(chat_stack: Stack, analysis_id: str) -> None:
    _is_problem(_chat(chat_stack, _question(analysis_id=analysis_id), "clinic-b"), 404, "not-found")
    completions = httpx.post(
        f"{chat_stack.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "analysis_id": analysis_id},
        headers=_auth("clinic-b"),
        timeout=30,
    )
    _is_problem(completions, 404, "not-found")
    unauthenticated = httpx.post(f"{chat_stack.url}/v1/chat", json=_question(analysis_id="x"))
    _is_problem(unauthenticated, 401, "unauthorized")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/chat", {"analysis_id": "x", "messages": []}, 422, "validation-error"),
        ("/v1/chat", {"messages": [{"role": "user", "content": "hi"}]}, 422, "validation-error"),
        (
            "/v1/chat",
            {"analysis_id": "x", "messages": [{"role": "assistant", "content": "hi"}]},
            422,
            "validation-error",
        ),
        (
            "/v1/chat",
            {"analysis_id": "x", "messages": [{"role": "system", "content": "hi"}]},
            422,
            "validation-error",
        ),
        ("/v1/chat", {"image": "not base64!", **_question()}, 422, "validation-error"),
        (
            "/v1/chat",
            {"image": base64.b64encode(b"plain text").decode(), **_question()},
            415,
            "unsupported_format",
        ),
        ("/v1/chat", {"analysis_id": "x", **_question(max_tokens=0)}, 422, "validation-error"),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "https://x.org/a.png"}},
                            {"type": "text", "text": "hi"},
                        ],
                    }
                ]
            },
            422,
            "validation-error",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "system", "content": "be brief"}], "analysis_id": "x"},
            422,
            "validation-error",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 422, None),
    ],
)
def test_bad_chat_requests_are_problems(
    chat_stack: Stack, path: str, body: dict[str, Any], status: int, code: str | None
) -> None:
    reply = httpx.post(f"{chat_stack.url}{path}", json=body, headers=_auth("clinic-a"), timeout=30)
    _is_problem(reply, status, code or "validation-error")


@pytest.mark.slow
@needs_model
def test_busy_language_model_is_503_and_a_client_leaving_a_stream_cancels_it(
    chat_stack: Stack, analysis_id: str
) -> None:
    """One generation slot, no queue: while a long answer streams, another question is
    refused (503 language-busy); closing the stream stops the generation and frees the slot."""
    metrics = f"http://127.0.0.1:{chat_stack.metrics_ports['language']}/metrics"

    def active() -> float:
        text = httpx.get(metrics, timeout=5).text
        found = re.search(r"^retinal_language_active_generations (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    long_answer = (
        "Describe every measurement of this photograph in detail, one sentence each, and "
        "explain what each one means for the patient."
    )
    body = json.dumps(
        {
            "analysis_id": analysis_id,
            "messages": [{"role": "user", "content": long_answer}],
            "max_tokens": 200,
            "temperature": 0,
            "stream": True,
        }
    ).encode()
    head = (
        f"POST /v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEYS['clinic-a']}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    # A raw connection: the client can leave at any moment, whatever the model has said.
    client = socket.create_connection(("127.0.0.1", chat_stack.ports["gateway"]))
    try:
        client.sendall(head + body)
        wait_until(lambda: active() == 1.0, 60, "the generation to start")
        busy = _chat(chat_stack, _question(analysis_id=analysis_id, max_tokens=4))
        _is_problem(busy, 503, "language-busy")
        assert int(busy.headers["Retry-After"]) > 0
    finally:
        client.close()
    # The client is gone: the gateway cancels the gRPC stream (at the latest once the first
    # sentence arrives) and the model stops.
    wait_until(lambda: active() == 0.0, 90, "the generation to stop")
    assert "chat stream cancelled" in chat_stack.services["gateway"].log


def _local_gateway(tmp_path: Path, **settings: Any) -> Any:
    from fastapi.testclient import TestClient

    from services.gateway.app import create_app
    from services.gateway.settings import GatewaySettings

    return TestClient(
        create_app(GatewaySettings(results_url=f"sqlite:///{tmp_path / 'r.db'}", **settings))
    )


def test_a_chat_request_over_the_size_cap_is_a_413(tmp_path: Path) -> None:
    with _local_gateway(tmp_path, max_upload_mb=1) as client:
        image = "A" * (3 * 1024 * 1024)
        reply = client.post("/v1/chat", json={"image": image, **_question()})
        _is_problem(reply, 413, "too_large_bytes")


def test_language_service_down_or_silent_is_503_or_504(tmp_path: Path) -> None:
    silent = socket.socket()  # accepts connections, never answers: the call hits its deadline
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True).start()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    down = f"127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    try:
        for address, status, code in (
            (down, 503, "backend-unavailable"),
            (f"127.0.0.1:{silent.getsockname()[1]}", 504, "backend-timeout"),
        ):
            with _local_gateway(tmp_path, language_addr=address, language_deadline_s=1.0) as client:
                stored = client.app.state.store.save_analysis(  # type: ignore[attr-defined]
                    "local", f"key-{status}", example_findings(), {}
                )
                started = time.monotonic()
                reply = client.post("/v1/chat", json=_question(analysis_id=stored.id))
                _is_problem(reply, status, code)
                assert "language" in reply.json()["detail"]
                assert time.monotonic() - started < 10
    finally:
        silent.close()
        for connection in accepted:
            connection.close()
