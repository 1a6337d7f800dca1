"""Benchmark of the committed vessel + artery/vein weights; writes bench/results/vessels.json.

    .venv/bin/python -m bench.vessels [--data-root ../shared/datasets] [--repeats 7]

- DRIVE test (20), reference 1st_manual, inside the FOV masks: AUC, Dice, Se, Sp, Acc at the
  manifest's threshold (chosen on training images), beside the 2nd human observer's figures;
  also the same in fp32 to show what bf16 inference costs in accuracy.
- STARE held-out 10 (im0162-im0324, labels-ah, FOV by threshold): Dice and the rest.
- Artery/vein on LES-AV test (11) and RITE test (20): accuracy and F1 on the reference's
  artery and vein pixels (crossings excluded).
- CRAE, CRVE and AVR (Knudtson, px, zones B and C) on the same test images, measured by the
  feature engine once from our A/V maps and once from the reference A/V labels (crossings count
  as both), with the same optic disc (our disc model's) placing the zones: per image and their
  mean absolute and relative differences, so A/V errors show as caliber errors.
- The same without the mirror average (`single_pass`), to show what it buys and costs.
- Time per image for the whole `predict` (FOV detection, canonical grid, network, mapping
  back): a DRIVE image and a 2000-px-wide photograph (a LES-AV test image upscaled in memory),
  median of --repeats runs after a warm-up; and the network pass alone.
Skips (exit 0, a message) when the datasets are absent.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from services.analysis.engine.disc import DiscSegmenter
from services.analysis.engine.preprocess import network_input
from services.analysis.engine.vessels import DEFAULT_WEIGHTS, VesselSegmenter
from services.analysis.features import MaskSet, measure
from shared.findings import Region
from shared.imaging.fov import detect_field_of_view
from training.segmentation import datasets, evaluate

RESULTS = Path(__file__).resolve().parent / "results" / "vessels.json"
LARGE_WIDTH = 2000


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 4)


def second_observer(root: Path) -> dict[str, float]:
    """DRIVE test 2nd_manual against 1st_manual, inside the FOV: the human baseline."""
    predicted, reference = [], []
    for sample in datasets.drive(root, "test"):
        fov = datasets.read_fov(sample, datasets.read_rgb(sample))
        predicted.append(
            datasets.read_vessel(datasets.drive_second_observer(root, sample.image_id))[fov]
        )
        reference.append(datasets.read_vessel(sample.vessel)[fov])
    scores = evaluate.binary_metrics(np.concatenate(predicted), np.concatenate(reference))
    return {key: round(value, 4) for key, value in scores.items()}


def timings(segmenter: VesselSegmenter, root: Path, repeats: int) -> dict[str, object]:
    drive_rgb = datasets.read_rgb(datasets.drive(root, "test")[0])
    les_av = datasets.read_rgb(datasets.les_av(root, "test")[0])
    height = round(les_av.shape[0] * LARGE_WIDTH / les_av.shape[1])
    large = np.asarray(Image.fromarray(les_av).resize((LARGE_WIDTH, height), Image.BICUBIC))
    inputs, _ = network_input(drive_rgb, detect_field_of_view(drive_rgb))
    return {
        "drive_565x584_predict_s": median_seconds(lambda: segmenter.predict(drive_rgb), repeats),
        f"large_{LARGE_WIDTH}x{height}_predict_s": median_seconds(
            lambda: segmenter.predict(large), repeats
        ),
        "network_pass_576_s": median_seconds(lambda: segmenter.logits(inputs[None]), repeats),
        "repeats": repeats,
        "statistic": "median after one warm-up run",
    }


CALIBERS = ("crae_knudtson", "crve_knudtson", "avr_knudtson")


def calibers(masks: MaskSet) -> dict[str, float | None]:
    by_region = {c.region: c for c in measure(masks).vessels.calibers}
    return {
        f"{name}_{region}": getattr(by_region[region], name)
        for region in (Region.ZONE_B, Region.ZONE_C)
        for name in CALIBERS
    }


def caliber_report(
    segmenter: VesselSegmenter, disc_model: DiscSegmenter, samples: list[datasets.Sample]
) -> dict[str, object]:
    """CRAE / CRVE / AVR from our A/V maps against those from the reference labels, on the FOV
    crop the service measures, with our disc (both sides) placing zones B and C."""
    per_image: dict[str, object] = {}
    differences: dict[str, list[tuple[float, float]]] = {}
    for sample in samples:
        full = datasets.read_rgb(sample)
        x0, y0, x1, y1 = detect_field_of_view(full).crop
        rgb = np.ascontiguousarray(full[y0:y1, x0:x1])
        reference = datasets.read_av(sample)[y0:y1, x0:x1]
        disc = disc_model.analyse(rgb)
        if not disc.found:
            per_image[sample.image_id] = f"not measured: {disc.reason}"
            continue
        ours = segmenter.predict(rgb).labels
        mine = calibers(MaskSet(ours > 0, ours == 1, ours == 2, disc.disc, disc.cup))
        truth = calibers(
            MaskSet(
                reference > 0,
                (reference == 1) | (reference == 3),
                (reference == 2) | (reference == 3),
                disc.disc,
                disc.cup,
            )
        )
        per_image[sample.image_id] = {"ours": mine, "reference": truth}
        for key, value in mine.items():
            if value is not None and truth[key] is not None:
                differences.setdefault(key, []).append((value, truth[key]))
    summary = {
        key: {
            "images": len(pairs),
            "mean_reference": float(np.mean([t for _, t in pairs])),
            "mean_ours": float(np.mean([o for o, _ in pairs])),
            "mean_absolute_difference": float(np.mean([abs(o - t) for o, t in pairs])),
            "mean_relative_difference": float(np.mean([abs(o - t) / t for o, t in pairs])),
        }
        for key, pairs in differences.items()
    }
    return {"summary": summary, "per_image": per_image}


def run(root: Path, weights: Path, repeats: int, threads: int | None) -> dict[str, object]:
    segmenter = VesselSegmenter.load(weights, threads=threads)
    threshold = segmenter.threshold
    drive_test = datasets.drive(root, "test")
    drive_scores = evaluate.score_vessels(segmenter, drive_test)
    fp32 = VesselSegmenter.load(weights, precision="fp32", threads=threads)
    fp32_report = evaluate.vessel_report(evaluate.score_vessels(fp32, drive_test), threshold)
    single = VesselSegmenter.load(weights, threads=threads, mirror_average=False)
    single_report = evaluate.vessel_report(evaluate.score_vessels(single, drive_test), threshold)
    drive_rgb = datasets.read_rgb(drive_test[0])
    disc_model = DiscSegmenter()
    return {
        "model": segmenter.version,
        "sha256": segmenter.manifest["sha256"],
        "date": dt.date.today().isoformat(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average_1min": round(os.getloadavg()[0], 2),  # other jobs share the cores
            "device": str(segmenter.device),
            "precision": segmenter.precision,
        },
        "threshold": {"value": threshold, "chosen_on": "training images (DRIVE 21-40, STARE 10)"},
        "drive_test": evaluate.vessel_report(drive_scores, threshold),
        "drive_test_fp32": {key: fp32_report[key] for key in ("auc", "dice", "accuracy")},
        "single_pass": {  # without the mirror average, for comparison
            "drive_test": {key: single_report[key] for key in ("auc", "dice", "accuracy")},
            "les_av_test_accuracy": evaluate.av_report(single, datasets.les_av(root, "test"))[
                "accuracy"
            ],
            "rite_test_accuracy": evaluate.av_report(single, drive_test)["accuracy"],
            "drive_565x584_predict_s": median_seconds(lambda: single.predict(drive_rgb), repeats),
        },
        "drive_second_observer": second_observer(root),
        "stare_test": evaluate.vessel_report(
            evaluate.score_vessels(segmenter, datasets.stare(root, "test")), threshold
        ),
        "les_av_test": evaluate.av_report(segmenter, datasets.les_av(root, "test")),
        "rite_test": evaluate.av_report(segmenter, drive_test),
        "les_av_test_calibers": caliber_report(
            segmenter, disc_model, datasets.les_av(root, "test")
        ),
        "rite_test_calibers": caliber_report(segmenter, disc_model, drive_test),
        "timing": timings(segmenter, root, repeats),
    }


def _rounded(value: object) -> object:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="vessel + A/V benchmark")
    parser.add_argument("--data-root", type=Path, default=datasets.DEFAULT_ROOT)
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: all cores; 1 when a core is busy)"
    )
    args = parser.parse_args(argv)
    if not (args.data_root / "DRIVE").is_dir():
        print(f"skipped: no datasets under {args.data_root}")
        return
    results = _rounded(run(args.data_root, args.weights, max(5, args.repeats), args.threads))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({key: value for key, value in results.items() if key != "machine"}, indent=2))


if __name__ == "__main__":
    main()
