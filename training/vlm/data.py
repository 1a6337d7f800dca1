"""The instruction-data pipeline: images -> our own findings + labels -> conversations.

    python -m training.vlm.data --out var/vlm/data [--datasets DRIVE STARE ...] [--seed 0]

For every image of the datasets in ../shared/datasets the analysis engine and the lesion
detector run in-process (findings cached per image under --cache, so a rerun is quick), the
dataset's labels are attached, and conversations are written by seeded templates
(`training/vlm/conversations.py`) in LLaVA JSONL: `{split}_{track}.jsonl` for the splits
`train` / `heldout` (by image: a stable hash puts about one image in five in heldout) and the
tracks `alignment` / `instruction` / `values`. `stats.json` counts turns, question types and token
lengths. Images are referenced by path, never copied. With `--endpoint URL` an
OpenAI-compatible server writes the instruction conversations instead (cached, resumable,
every answer grounding-checked: `training/vlm/endpoint_writer.py`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from shared import findings as F
from training.vlm import conversations
from training.vlm.endpoint_writer import Endpoint, EndpointWriter
from training.vlm.records import LabeledImage

REPO = Path(__file__).resolve().parents[2]
DATASETS = Path(os.environ.get("RETINAL_DATASETS", REPO.parent / "shared" / "datasets"))
HELDOUT_ONE_IN = 5
LOCAL_DATASETS = ("DRIVE", "STARE", "LES-AV", "Drishti-GS1", "IDRiD-seg")


def _images(folder: Path, pattern: str = "*") -> list[Path]:
    return sorted(
        p
        for p in folder.glob(pattern)
        if p.suffix.lower() in {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".ppm"}
    )


def _drishti_cdr(case: str) -> dict[str, str]:
    """Drishti-GS1's experts' mean vertical CDR (its per-image cdrValues file)."""
    found = list((DATASETS / "Drishti-GS1/Training/GT" / case).glob("*cdrValues.txt"))
    if not found:
        return {}
    values = [float(v) for v in found[0].read_text().split() if v.replace(".", "").isdigit()]
    return {"expert_vertical_cdr": f"{statistics.mean(values):.2f}"} if values else {}


def local_images(names: tuple[str, ...] = LOCAL_DATASETS) -> Iterator[LabeledImage]:
    """The images of ../shared/datasets with what their folders say about them."""
    layouts = {
        "DRIVE": ["DRIVE/training/images", "DRIVE/test/images"],
        "STARE": ["STARE/stare-images"],
        "LES-AV": ["LES-AV/training/images", "LES-AV/test/images"],
        "Drishti-GS1": ["Drishti-GS1/Training/Images"],
        "IDRiD-seg": ["IDRiD-seg/images"],
    }
    for name in names:
        for folder in layouts[name]:
            for path in _images(DATASETS / folder):
                labels: dict[str, str] = {}
                if name == "Drishti-GS1":
                    labels = _drishti_cdr(path.stem)
                elif name == "IDRiD-seg":
                    # every IDRiD segmentation image was chosen for its DR lesions
                    labels = {"diagnosis": "diabetic retinopathy (lesions annotated)"}
                yield LabeledImage(name, f"{Path(folder).parts[-2]}_{path.stem}", path, labels)


def split_of(image: LabeledImage) -> str:
    digest = hashlib.sha256(f"{image.dataset}/{image.image_id}".encode()).digest()
    return "heldout" if digest[0] % HELDOUT_ONE_IN == 0 else "train"


class FindingsCache:
    """Findings per image from the analysis engine and the lesion detector, kept as JSON."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._engines: tuple[object, object] | None = None

    def _compute(self, path: Path) -> F.Findings:
        from services.analysis.engine.analyzer import Analyzer
        from services.analysis.settings import AnalysisSettings
        from services.lesion.engine.detection import detect, merged
        from services.lesion.engine.detector import LesionDetector
        from services.lesion.settings import LesionSettings
        from shared.imaging import ingest

        if self._engines is None:
            self._engines = (
                Analyzer.load(AnalysisSettings().weights_dir),
                LesionDetector.load(LesionSettings().weights),
            )
        analyzer, detector = self._engines
        image = ingest(path.read_bytes())
        result = analyzer.analyze(image.rgb, image.info).findings  # type: ignore[attr-defined]
        detection = detect(detector, image.rgb, image.info, result, ())  # type: ignore[arg-type]
        return merged(result, detection, detector)  # type: ignore[arg-type]

    def get(self, image: LabeledImage) -> F.Findings:
        cached = self.folder / image.dataset / f"{image.image_id}.json"
        if cached.is_file():
            return F.Findings.model_validate_json(cached.read_text())
        result = self._compute(image.path)
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(result.model_dump_json(exclude_none=True))
        return result


def build(
    images: list[LabeledImage],
    cache: FindingsCache,
    out: Path,
    seed: int,
    instruction_per_image: int,
    writer: EndpointWriter | None = None,
    values_per_image: int = 0,
) -> dict[str, object]:
    """Write the JSONL files and stats.json. With `writer`, the instruction conversations are
    the endpoint's where it wrote acceptable ones, the templates' otherwise."""
    planned = []
    for image in tqdm(images, desc="findings", unit="img"):
        result = cache.get(image)
        rng = random.Random(f"{seed}/{image.dataset}/{image.image_id}")
        aligned = conversations.alignment(rng, result)
        templates = [
            conversations.instruction(rng, result, image) for _ in range(instruction_per_image)
        ]
        drills = [
            conversations.values(rng, result, rng.randint(6, 10)) for _ in range(values_per_image)
        ]
        planned.append((image, result, aligned, templates, drills))
    generated: list[list[conversations.Turn] | None] = []
    if writer is not None:
        requests = [
            writer.request(f"{image.dataset}/{image.image_id}", result, index, len(turns))
            for image, result, _, templates, _ in planned
            for index, turns in enumerate(templates)
        ]
        generated = writer.write(requests)
    written = iter(generated)

    out.mkdir(parents=True, exist_ok=True)
    files = {
        (split, track): (out / f"{split}_{track}.jsonl").open("w")
        for split in ("train", "heldout")
        for track in ("alignment", "instruction", "values")
    }
    kinds: Counter[str] = Counter()
    turns_per: list[int] = []
    answer_words: list[int] = []
    per_split: Counter[str] = Counter()
    try:
        for image, result, aligned, templates, drills in planned:
            split = split_of(image)
            per_split[split] += 1
            name = f"{image.dataset}/{image.image_id}"
            record = conversations.to_llava(f"{name}/alignment", image, aligned, result)
            files[split, "alignment"].write(json.dumps(record) + "\n")
            for index, template in enumerate(templates):
                turns = next(written, None) or template
                record = conversations.to_llava(f"{name}/instruction/{index}", image, turns, result)
                files[split, "instruction"].write(json.dumps(record) + "\n")
                kinds.update(t.kind for t in turns)
                turns_per.append(len(turns))
                answer_words.extend(len(t.answer.split()) for t in turns)
            for index, turns in enumerate(drills):
                record = conversations.to_llava(f"{name}/values/{index}", image, turns, result)
                files[split, "values"].write(json.dumps(record) + "\n")
    finally:
        for handle in files.values():
            handle.close()
    stats: dict[str, object] = {
        "images": dict(per_split),
        "datasets": dict(Counter(i.dataset for i in images)),
        "instruction_conversations": len(turns_per),
        "values_conversations": sum(len(drills) for *_, drills in planned),
        "turns_per_conversation": dict(sorted(Counter(turns_per).items())),
        "question_types": dict(kinds.most_common()),
        "answer_words": {
            "median": statistics.median(answer_words) if answer_words else 0,
            "max": max(answer_words, default=0),
        },
        "seed": seed,
    }
    if writer is not None:
        stats["endpoint"] = {"model": writer.endpoint.model, **writer.counts}
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "var/vlm/data")
    parser.add_argument("--cache", type=Path, default=REPO / "var/vlm/findings")
    parser.add_argument("--datasets", nargs="+", default=list(LOCAL_DATASETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--instruction-per-image", type=int, default=8)
    parser.add_argument(
        "--values-per-image", type=int, default=8, help="conversations of the values track"
    )
    endpoint = parser.add_argument_group(
        "endpoint", "conversations written by an OpenAI-compatible server instead of templates"
    )
    endpoint.add_argument("--endpoint", help="its /v1 base URL, e.g. http://127.0.0.1:8000/v1")
    endpoint.add_argument("--endpoint-model", default="gpt-4o-mini")
    endpoint.add_argument(
        "--endpoint-key-env", default="OPENAI_API_KEY", help="environment variable with its key"
    )
    endpoint.add_argument("--endpoint-concurrency", type=int, default=4)
    endpoint.add_argument("--endpoint-cache", type=Path, default=REPO / "var/vlm/endpoint")
    args = parser.parse_args()
    images = list(local_images(tuple(args.datasets)))
    if not images:
        raise SystemExit(f"no images under {DATASETS}")
    writer = None
    if args.endpoint:
        writer = EndpointWriter(
            Endpoint(
                args.endpoint,
                args.endpoint_model,
                os.environ.get(args.endpoint_key_env, ""),
                args.endpoint_concurrency,
            ),
            args.endpoint_cache,
        )
    stats = build(
        images,
        FindingsCache(args.cache),
        args.out,
        args.seed,
        args.instruction_per_image,
        writer,
        args.values_per_image,
    )
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
