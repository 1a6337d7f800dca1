"""`python -m training.vlm.data --endpoint URL`: instruction conversations written by a real
OpenAI-compatible server (vLLM's, serving RetinalGPT-mini from .venv-vllm), constrained to
the schema's JSON by the server, grounding-checked, cached and resumable.

RetinalGPT-mini writes poor conversations, with invented numbers: which is what shows that
the grounding check refuses them and the templates stand in.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.language.facts import facts_from_findings
from services.language.grounding import GroundingChecker
from services.language.prompting import stated_texts
from services.language.settings import LanguageSettings
from tests.conftest import free_port, wait_until
from tests.findings_examples import example_findings
from tests.test_vlm_pipeline import MINI, images_with_findings
from training.vlm import data
from training.vlm.endpoint_writer import Endpoint, EndpointWriter, GeneratedConversation

pytestmark = pytest.mark.slow
SERVED_NAME = "retinalgpt-mini"


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = LanguageSettings()
    if not Path(settings.vllm_python).exists() or not MINI.is_dir():
        pytest.skip("no .venv-vllm or RetinalGPT-mini (make setup)")
    port = free_port()
    log = (tmp_path_factory.mktemp("vllm") / "vllm.log").open("wb")
    command = [settings.vllm_python, "-m", "vllm.entrypoints.openai.api_server"]
    command += ["--model", str(MINI), "--served-model-name", SERVED_NAME]
    command += ["--host", "127.0.0.1", "--port", str(port), *settings.vllm_args]
    server = subprocess.Popen(
        command,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(settings.vllm_cpu_kvcache_gib)},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its engine process goes with it
    )

    def healthy() -> bool:
        assert server.poll() is None, "the vLLM server exited"
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(healthy, 300, "the vLLM server")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def test_conversations_from_an_endpoint_are_checked_cached_and_resumed(
    endpoint: str, tmp_path: Path
) -> None:
    images, cache = images_with_findings(tmp_path, 3)
    replies = tmp_path / "replies"

    def build() -> dict[str, int]:
        writer = EndpointWriter(Endpoint(endpoint, SERVED_NAME, concurrency=3), replies)
        stats = data.build(images, cache, tmp_path / "out", 0, 1, writer)
        return stats["endpoint"]  # type: ignore[return-value]

    first = build()
    assert first["sent"] == 3 and "cached" not in first, first
    cached = sorted(replies.glob("*.json"))
    assert len(cached) == 3
    valid = 0
    for path in cached:
        try:
            GeneratedConversation.model_validate_json(json.loads(path.read_text())["content"])
            valid += 1
        except ValueError:
            pass
    assert first.get("refused_not_json", 0) == 3 - valid
    assert sum(first.get(k, 0) for k in ("accepted", "refused_unmeasured_value")) == valid

    # What was written states measured values only, whoever wrote it.
    result = example_findings()
    checker = GroundingChecker(*facts_from_findings(result), stated_texts(result))
    records = [
        json.loads(line)
        for split in ("train", "heldout")
        for line in (tmp_path / "out" / f"{split}_instruction.jsonl").read_text().splitlines()
    ]
    assert len(records) == 3
    for record in records:
        for turn in record["conversations"][1::2]:
            assert checker.check(turn["value"]).unmatched == 0, turn["value"]

    # An interrupted run (one reply missing) sends only the missing request.
    cached[0].unlink()
    again = build()
    assert (again["sent"], again["cached"]) == (1, 2), again
