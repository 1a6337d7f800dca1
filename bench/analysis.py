"""Full-analysis speed: ingest + every analysis stage + every feature, per image.

`python bench/analysis.py [--runs N]` times a DRIVE test image (565x584) and a Drishti-GS1
image (~2000 px) through `ingest` and `Analyzer.analyze` on this machine's CPU, and writes
bench/results/analysis.json. Skips (exit 0, a message) when ../shared/datasets is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from services.analysis.engine.analyzer import Analyzer
from services.analysis.settings import AnalysisSettings
from shared.imaging import ingest

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("RETINAL_DATASETS", REPO.parent / "shared" / "datasets"))
IMAGES = {
    "drive_test_01": "DRIVE/test/images/01_test.tif",
    "drishti_004": "Drishti-GS1/Training/Images/drishtiGS_004.jpg",
}


def time_image(analyzer: Analyzer, data: bytes, runs: int) -> dict[str, object]:
    analyzer.analyze(*_ingested(data))  # warm-up (first-call allocations, JIT)
    totals, stages = [], []
    for _ in range(runs):
        started = time.perf_counter()
        rgb, info = _ingested(data)
        result = analyzer.analyze(rgb, info)
        totals.append(time.perf_counter() - started)
        stages.append(result.findings.timings_ms)
    return {
        "median_s": round(statistics.median(totals), 3),
        "runs_s": [round(t, 3) for t in totals],
        "stage_median_ms": {
            stage: round(statistics.median(s[stage] for s in stages), 1) for stage in stages[0]
        },
        "quality": result.findings.quality.grade.value if result.findings.quality else None,
    }


def _ingested(data: bytes) -> tuple:
    image = ingest(data)
    return image.rgb, image.info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=None, help="PyTorch threads (default: every core)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "analysis.json")
    args = parser.parse_args()
    if not DATASETS.is_dir():
        print(f"skipped: no datasets at {DATASETS}")
        return
    analyzer = Analyzer.load(AnalysisSettings().weights_dir)
    if args.threads:
        # After loading: the vessel model sets one thread per core when it loads.
        torch.set_num_threads(args.threads)
    results = {}
    for name, relative in IMAGES.items():
        matches = sorted((DATASETS / relative).parent.glob(Path(relative).stem + ".*"))
        data = matches[0].read_bytes()
        results[name] = time_image(analyzer, data, args.runs)
        print(name, results[name]["median_s"], "s")
    report = {
        "what": "ingest + full analysis (quality, vessels+A/V, disc/cup, fovea, all features)",
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_at_end": os.getloadavg(),
            "platform": platform.platform(),
        },
        "models": [m.model_dump() for m in analyzer.models],
        "runs": args.runs,
        "images": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
