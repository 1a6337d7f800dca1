"""Score a model through the language service on the held-out images.

    python -m training.vlm.evaluate --model-dir var/models/retinalgpt-mini \
        --out bench/results/vlm_eval_untuned.json [--backend vllm]

The language service runs as a real process with the model; for every held-out image of the
pipeline (`heldout_instruction.jsonl`, findings included) it is asked, over gRPC:
- value questions, one per askable measured quantity (up to --values-per-image, seeded):
  correct when the model itself wrote the measured value, judged on its raw text (the
  grounding report lists every value as written, `measured` or not, before the repair);
- a question about something never measured: correct when the answer states no number;
- the screening questions the dataset's labels can judge (DR for IDRiD, glaucoma by the
  experts' CDR for Drishti-GS1): accuracy and F1 per dataset.
Also reported: the rate of unmeasured values among all values written (before the repair)
and answer coverage per question type.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

from protos.retinal.v1 import language_pb2, language_pb2_grpc
from shared import findings as F
from shared import pixels
from shared.convert import findings_to_proto
from shared.healthcheck import grpc_serving
from training.vlm.conversations import UNMEASURED_LABELS, askable_facts

REPO = Path(__file__).resolve().parents[2]
GLAUCOMA_CDR = 0.6  # the experts' mean vertical CDR from which a Drishti eye counts as suspect
_YES = {"yes", "referable", "suspect", "signs", "found", "present"}
_NEGATIONS = {"no", "not", "without", "none", "never"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def heldout_images(data: Path) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for line in (data / "heldout_instruction.jsonl").read_text().splitlines():
        record = json.loads(line)
        seen.setdefault(record["image"], record)
    return list(seen.values())


def says_yes(answer: str) -> bool:
    """Whether an answer affirms: a yes-word with no negation in the three words before it
    ("not referable", "no signs of", "no lesions were found" do not affirm)."""
    words = re.findall(r"[a-z]+", answer.lower())
    return any(
        word in _YES and not _NEGATIONS & set(words[max(0, i - 3) : i])
        for i, word in enumerate(words)
    )


def questions(record: dict[str, Any], rng: random.Random, values: int) -> list[dict[str, Any]]:
    result = F.Findings.model_validate(record["findings"])
    asked = []
    facts = askable_facts(result)
    for fact in rng.sample(facts, k=min(values, len(facts))):
        asked.append({"kind": "value", "text": f"What is the {fact.spoken}?", "key": fact.key})
    label = rng.choice(UNMEASURED_LABELS)
    asked.append({"kind": "not_measured", "text": f"What is the {label}?"})
    dataset = record["id"].split("/")[0]
    if dataset == "IDRiD-seg":
        asked.append(
            {
                "kind": "diagnosis",
                "text": "Are there signs of diabetic retinopathy?",
                "label": True,
                "dataset": dataset,
            }
        )
    cdr = record.get("labels", {}).get("expert_vertical_cdr")
    if dataset == "Drishti-GS1" and cdr is not None:
        asked.append(
            {
                "kind": "diagnosis",
                "text": "Is this eye a glaucoma suspect?",
                "label": float(cdr) >= GLAUCOMA_CDR,
                "dataset": dataset,
            }
        )
    return asked


def _request(record: dict[str, Any], question: str, max_tokens: int) -> language_pb2.ChatRequest:
    with Image.open(record["image"]) as image:
        rgb = np.asarray(image.convert("RGB").resize((448, 448)))
    return language_pb2.ChatRequest(
        image=pixels.to_message(rgb, F.ImageInfo(width=448, height=448)),
        findings=findings_to_proto(F.Findings.model_validate(record["findings"])),
        conversation=[language_pb2.Turn(role=language_pb2.ROLE_USER, text=question)],
        options=language_pb2.GenerationOptions(max_tokens=max_tokens, temperature=0.0),
    )


def score(items: list[tuple[dict[str, Any], language_pb2.ChatResponse]]) -> dict[str, Any]:
    by_kind: dict[str, list[bool]] = defaultdict(list)
    answered: dict[str, list[bool]] = defaultdict(list)
    written = unmeasured = 0
    diagnosis: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for question, reply in items:
        values = reply.grounding.values
        written += len(values)
        unmeasured += sum(not v.measured for v in values)
        answered[question["kind"]].append(bool(reply.answer.strip()))
        if question["kind"] == "value":
            by_kind["value"].append(
                any(v.measured and v.findings_key == question["key"] for v in values)
            )
        elif question["kind"] == "not_measured":
            by_kind["not_measured"].append(not values)
        else:
            diagnosis[question["dataset"]].append((question["label"], says_yes(reply.answer)))
    table: dict[str, Any] = {
        kind: {"questions": len(v), "correct": round(sum(v) / len(v), 3)}
        for kind, v in by_kind.items()
        if v
    }
    for dataset, pairs in diagnosis.items():
        tp = sum(t and p for t, p in pairs)
        fp = sum(p and not t for t, p in pairs)
        fn = sum(t and not p for t, p in pairs)
        table[f"diagnosis_{dataset}"] = {
            "questions": len(pairs),
            "accuracy": round(sum(t == p for t, p in pairs) / len(pairs), 3),
            "f1": round(2 * tp / (2 * tp + fp + fn), 3) if tp + fp + fn else None,
        }
    table["unmeasured_value_rate"] = round(unmeasured / written, 3) if written else 0.0
    table["values_written"] = written
    table["coverage"] = {k: round(sum(v) / len(v), 3) for k, v in answered.items()}
    return table


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    records = heldout_images(args.data)
    rng = random.Random(args.seed)
    asked = [(r, q) for r in records for q in questions(r, rng, args.values_per_image)]
    port = _free_port()
    env = {
        **os.environ,
        "RETINAL_LANGUAGE_PORT": str(port),
        "RETINAL_LANGUAGE_METRICS_PORT": "0",
        "RETINAL_LANGUAGE_MODEL_DIR": str(args.model_dir.resolve()),
        "RETINAL_LANGUAGE_BACKEND": args.backend,
        "RETINAL_LANGUAGE_MAX_CONCURRENCY": "8",
        "RETINAL_LANGUAGE_MAX_QUEUE": "1024",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "services.language"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"127.0.0.1:{port}"
    started = time.monotonic()
    try:
        while not grpc_serving(address):
            if process.poll() is not None:
                raise RuntimeError("the language service exited")
            time.sleep(1)
        with grpc.insecure_channel(address) as channel:
            stub = language_pb2_grpc.LanguageServiceStub(channel)
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                replies = list(
                    pool.map(
                        lambda item: stub.Chat(
                            _request(item[0], item[1]["text"], args.max_tokens), timeout=900
                        ),
                        asked,
                    )
                )
    finally:
        process.terminate()
        process.wait(timeout=60)
    table = score([(q, reply) for (_, q), reply in zip(asked, replies, strict=True)])
    examples = [
        {
            "question": q["text"],
            "answer": reply.answer,
            "values": [(v.text, v.measured) for v in reply.grounding.values],
        }
        for (_, q), reply in list(zip(asked, replies, strict=True))[:8]
    ]
    return {
        "model_dir": str(args.model_dir),
        "backend": args.backend,
        "heldout_images": len(records),
        "questions": len(asked),
        "scores": table,
        "wall_s": round(time.monotonic() - started, 1),
        "examples": examples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "var/vlm/data")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--backend", default="vllm", choices=("vllm", "transformers"))
    parser.add_argument("--values-per-image", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    report = evaluate(args)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["scores"], indent=2))


if __name__ == "__main__":
    main()
