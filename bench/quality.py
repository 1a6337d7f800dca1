"""Quality grades of every real photograph in ../shared/datasets, and the held-out metrics.

`python bench/quality.py` writes bench/results/quality.json: per dataset folder, how many
images the committed grader calls good / usable / reject (these curated research sets are
gradable, so "reject" there is a false reject), plus the held-out figures on degraded images
recorded in the model's manifest by its training run.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from services.analysis.engine.quality import QualityGrader
from services.analysis.settings import AnalysisSettings
from shared.imaging import ingest
from training.quality.data import FUNDUS_FOLDERS

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("RETINAL_DATASETS", REPO.parent / "shared" / "datasets"))


def main() -> None:
    if not DATASETS.is_dir():
        print(f"skipped: no datasets at {DATASETS}")
        return
    grader = QualityGrader.load(AnalysisSettings().weights_dir / "quality.safetensors")
    per_folder: dict[str, dict[str, int]] = {}
    rejected: list[str] = []
    for folder in FUNDUS_FOLDERS:
        grades: Counter[str] = Counter()
        for path in sorted((DATASETS / folder).glob("*")):
            grade = grader.grade(ingest(path.read_bytes()).rgb).grade
            assert grade is not None
            grades[grade.value] += 1
            if grade.value == "reject":
                rejected.append(f"{folder}/{path.name}")
        per_folder[folder] = dict(grades)
    total = sum(sum(g.values()) for g in per_folder.values())
    report = {
        "model": {k: grader.files.manifest[k] for k in ("name", "version", "sha256")},
        "real_photographs": {
            "per_folder": per_folder,
            "total": total,
            "false_reject_rate": round(len(rejected) / total, 4),
            "rejected": rejected,
        },
        "held_out_degraded": grader.files.manifest["metrics"]["held_out"],
    }
    out = REPO / "bench" / "results" / "quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["real_photographs"], indent=1))


if __name__ == "__main__":
    main()
