"""`retinal analyze` and `retinal features`: the analysis engine in-process, on files."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, Any

import numpy as np
import typer
from PIL import Image
from tqdm import tqdm

from services.analysis.engine.analyzer import AnalysisResult, Analyzer
from services.lesion.engine.detection import Detection, detect, merged
from services.lesion.engine.detector import NAMES, SHORT_NAMES, TYPES, LesionDetector
from shared import findings, tables
from shared.imaging import ImageRejected, ingest

# Output options shared by `retinal analyze` and `retinal batch results`.
JsonlOutput = Annotated[
    Path | None, typer.Option(help="Findings as JSON Lines (default: standard output)")
]
CsvOutput = Annotated[
    Path | None, typer.Option("--csv", help="One row per image, AutoMorph's column names")
]

MASK_LAYERS = ("vessel_prob", "vessel", "artery", "vein", "disc", "cup")
LESION_MASK_LAYERS = NAMES  # ma, he, ex, se


def expand(paths: Iterable[Path]) -> Iterator[Path]:
    """Files as given; folders walked recursively in name order (hidden files skipped)."""
    for path in paths:
        if path.is_dir():
            yield from (
                p
                for p in sorted(path.rglob("*"))
                if p.is_file() and not any(part.startswith(".") for part in p.parts)
            )
        else:
            yield path


def _uncrop(layer: np.ndarray, info: findings.ImageInfo) -> np.ndarray:
    """A layer of the analysed (cropped) grid, placed back at the size of the input."""
    full = np.zeros((info.height, info.width), layer.dtype)
    fov = info.field_of_view
    x0, y0 = (fov.crop_x0, fov.crop_y0) if fov else (0, 0)
    full[y0 : y0 + layer.shape[0], x0 : x0 + layer.shape[1]] = layer
    return full


def save_masks(
    result: AnalysisResult, detection: Detection | None, stem: str, folder: Path
) -> None:
    """<stem>_<layer>.png, input-sized: analysis layers, then lesion types (0/255)."""
    info = result.findings.image
    assert info is not None
    folder.mkdir(parents=True, exist_ok=True)
    layers = {name: result.layers[name] for name in MASK_LAYERS if name in result.layers}
    if detection is not None:
        layers.update({SHORT_NAMES[t]: mask for t, mask in detection.masks.items()})
    for name, layer in layers.items():
        pixels = np.round(layer * 255) if name == "vessel_prob" else layer.astype(np.float32) * 255
        Image.fromarray(_uncrop(pixels.astype(np.uint8), info)).save(folder / f"{stem}_{name}.png")


@dataclass
class Outputs:
    jsonl: IO[str]
    table: csv.DictWriter[str] | None
    masks: Path | None

    def write(self, source: Path, record: dict[str, Any], row: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps({"source": str(source), **record}) + "\n")
        if self.table is not None:
            self.table.writerow({"source": str(source), **row})


def analyze_files(
    paths: list[Path],
    analyzer: Analyzer,
    detector: LesionDetector | None,
    outputs: Outputs,
) -> tuple[int, int]:
    """Analyse every file (lesions too, given a detector); returns (analysed, failed).

    A bad file never stops the run.
    """
    done = failed = 0
    for path in tqdm(paths, desc="analysing", unit="img"):
        try:
            image = ingest(path.read_bytes())
        except (ImageRejected, OSError) as error:
            code = getattr(error, "code", "unreadable")
            detail = getattr(error, "detail", None) or str(error)
            outputs.write(path, {"error": {"code": code, "detail": detail}}, {"error": code})
            failed += 1
            continue
        result = analyzer.analyze(image.rgb, image.info)
        found = result.findings
        detection = None
        if detector is not None:
            mask_types = TYPES if outputs.masks is not None else ()
            detection = detect(detector, image.rgb, image.info, found, mask_types)
            found = merged(found, detection, detector)
        outputs.write(
            path, {"findings": found.model_dump(mode="json", exclude_none=True)}, tables.row(found)
        )
        if outputs.masks is not None:
            save_masks(result, detection, path.stem, outputs.masks)
        done += 1
    return done, failed
