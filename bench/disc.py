"""Optic disc and cup benchmark: Drishti-GS1 5-fold CV and inference time.

    python -m bench.disc [--folds-dir var/disc] [--overlays var/disc/overlays]

Cross-validation: for each fold k with weights in <folds-dir>/fold<k>/ (written by
`training.segmentation.train_disc --fold k`), the full served pipeline is run again on that
fold's 10 held-out images; a fold without weights falls back to its recorded metrics.json.
Timing: the served models (services/analysis/weights) on a Drishti-GS1 image and a DRIVE
image, after ingestion (as the analysis service gets them), median of 7 after a warm-up.
`--overlays` also writes small PNGs of the served pipeline's disc (blue) and cup (green) on
a few photographs from other cameras, to look at: no disc labels exist for those.
Writes bench/results/disc.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from services.analysis.engine.disc import DiscSegmenter
from shared.imaging.ingest import ingest
from tests.conftest import DATASETS
from training.segmentation import disc_data
from training.segmentation.train_disc import evaluate_case, summarize

RESULTS = Path(__file__).resolve().parent / "results" / "disc.json"
TIMING_IMAGES = {
    "drishti": Path("Drishti-GS1/Training/Images/drishtiGS_002.jpg"),
    "drive": Path("DRIVE/test/images/01_test.tif"),
}
OVERLAY_IMAGES = (
    "DRIVE/test/images/01_test.tif",
    "DRIVE/test/images/05_test.tif",
    "STARE/stare-images/im0001.png",
    "STARE/stare-images/im0077.png",
    "LES-AV/test/images/224.png",
    "IDRiD-seg/images/IDRiD_03.jpg",
)


def cross_validation(folds_dir: Path, datasets: Path) -> dict[str, Any]:
    ids = disc_data.drishti_ids(datasets)
    per_fold: dict[str, Any] = {}
    for fold, test_ids in enumerate(disc_data.folds(ids)):
        run = folds_dir / f"fold{fold}"
        locator, segmenter = run / "disc_locator.safetensors", run / "disc_cup.safetensors"
        if locator.is_file() and segmenter.is_file():
            pipeline = DiscSegmenter(locator, segmenter)
            cases = [evaluate_case(pipeline, datasets, image_id) for image_id in test_ids]
            per_fold[f"fold{fold}"] = {
                "source": "re-evaluated from fold weights",
                **summarize(cases),
                "cases": cases,
            }
        elif (run / "metrics.json").is_file():
            recorded = json.loads((run / "metrics.json").read_text())
            per_fold[f"fold{fold}"] = {
                "source": "recorded metrics.json",
                **recorded["summary"],
                "cases": recorded["cases"],
            }
    done = list(per_fold.values())
    cases = [case for fold in done for case in fold["cases"]]
    return {
        "folds_completed": len(done),
        "folds": {
            name: {k: v for k, v in fold.items() if k != "cases"} for name, fold in per_fold.items()
        },
        "mean_over_folds": {
            k: float(np.mean([f[k] for f in done])) for k in ("disc_dice", "cup_dice", "vcdr_mae")
        }
        if done
        else {},
        "pooled_images": summarize(cases) if cases else {},
        "cases": cases,
    }


def timing(segmenter: DiscSegmenter, datasets: Path, repeats: int = 7) -> dict[str, Any]:
    results = {}
    for name, relative in TIMING_IMAGES.items():
        rgb = ingest((datasets / relative).read_bytes()).rgb
        segmenter.analyse(rgb)  # warm-up: first-call allocations and oneDNN kernel selection
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            segmenter.analyse(rgb)
            times.append(time.perf_counter() - start)
        results[name] = {
            "image": str(relative),
            "input_size": list(rgb.shape[:2]),
            "median_s": statistics.median(times),
            "max_s": max(times),
        }
    return results


def overlay(segmenter: DiscSegmenter, path: Path, out: Path) -> dict[str, Any]:
    rgb = ingest(path.read_bytes()).rgb
    result = segmenter.analyse(rgb)
    picture = rgb.copy()
    picture[result.disc] = picture[result.disc] // 2 + np.array([0, 0, 127], np.uint8)
    picture[result.cup] = picture[result.cup] // 2 + np.array([0, 127, 0], np.uint8)
    scale = 400 / max(rgb.shape[:2])
    size = (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale))
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).resize(size, Image.BILINEAR).save(out / f"{path.stem}.png")
    return {
        "image": str(path.name),
        "found": result.found,
        "center": result.center,
        "confidence": result.confidence,
        "vcdr": result.vertical_cdr,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folds-dir", type=Path, default=Path("var/disc"))
    parser.add_argument("--datasets", type=Path, default=DATASETS)
    parser.add_argument("--overlays", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    served = DiscSegmenter()
    report: dict[str, Any] = {
        "cross_validation": cross_validation(args.folds_dir, args.datasets),
        "served_models": {
            "locator": served.locator_files.label,
            "segmenter": served.segmenter_files.label,
        },
        "inference": {
            "threads": args.threads,
            "bf16": served.bf16,
            **timing(served, args.datasets),
        },
    }
    if args.overlays is not None:
        report["overlays"] = [
            overlay(served, args.datasets / p, args.overlays)
            for p in OVERLAY_IMAGES
            if (args.datasets / p).is_file()
        ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps({k: v for k, v in report["cross_validation"].items() if k != "cases"}, indent=2)
    )
    print(json.dumps(report["inference"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
