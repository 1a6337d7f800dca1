"""How well IDRiD-seg-512's JPEG masks, read as the lesion trainer reads them, match the
full-size masks; writes bench/results/lesion-masks-512.json.

    .venv/bin/python -m bench.lesion_masks_512

IDRiD-seg-512 holds all 54 training images, so IDRiD_01..20 are in both sets. Each 512-px
square is the photograph cropped to its field of view's columns and letterboxed; each mask is
the photograph's pixels inside the lesions, black elsewhere. For every full-size image the
reference is its full-size mask cropped to the same columns, area-averaged onto the square's
content rows and taken where at least half covered. Dice per lesion type, pooled over the 20
images, for the loader's rule (brightest channel above `data.LOWRES_MASK_LEVEL`), for the
grey-level rule it replaced (grey above 127), and for other levels of both.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import numpy as np
from PIL import Image

from training.lesions import data

RESULTS = Path(__file__).resolve().parent / "results" / "lesion-masks-512.json"
SIDE = 512
LEVELS = (20, 30, 40, 60, 90, 127)
BLACK = 20  # a column of the photograph brighter than this somewhere is inside the FOV crop


def reference_on_square(mask: np.ndarray, columns: tuple[int, int]) -> np.ndarray:
    """A full-size bool mask cropped to `columns` and letterboxed onto the 512-px square."""
    start, end = columns
    rows = round(mask.shape[0] * SIDE / (end - start))
    top = (SIDE - rows) // 2
    cropped = Image.fromarray(mask[:, start:end].astype(np.float32))
    out = np.zeros((SIDE, SIDE), dtype=bool)
    out[top : top + rows] = np.asarray(cropped.resize((SIDE, rows), Image.Resampling.BOX)) >= 0.5
    return out


def mask_planes(path: Path) -> dict[str, np.ndarray]:
    """The two readings of one 512-px JPEG mask: its brightest channel and its grey level."""
    return {
        "brightest": data.brightest_channel(path),
        "grey": np.asarray(Image.open(path).convert("L")),
    }


def measure(
    root: Path, image_ids: tuple[str, ...] = data.FULL_IDS
) -> dict[str, dict[str, dict[str, float]]]:
    """Dice per type, rule and level, pooled over the images (IDRiD_01..20 or some)."""
    folder = root / "IDRiD-seg-512" / "images" / "jpg"
    counts: dict[tuple[str, str, int], list[int]] = {}
    for image_id in image_ids:
        rgb, masks = data.load_full(image_id, root)
        inside = np.flatnonzero(rgb.max(axis=(0, 2)) > BLACK)
        columns = (int(inside[0]), int(inside[-1]) + 1)
        for channel, suffix in enumerate(data.LOWRES_SUFFIXES):
            path = folder / f"{image_id}_{suffix}.jpg"
            if not path.is_file():
                continue
            reference = reference_on_square(masks[channel], columns)
            for rule, plane in mask_planes(path).items():
                for level in LEVELS:
                    found = plane > level
                    tally = counts.setdefault((suffix, rule, level), [0, 0])
                    tally[0] += 2 * int((found & reference).sum())
                    tally[1] += int(found.sum() + reference.sum())
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (suffix, rule, level), (overlap, total) in counts.items():
        out.setdefault(suffix.lower(), {}).setdefault(rule, {})[str(level)] = round(
            overlap / max(total, 1), 4
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=data.DEFAULT_ROOT)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "images": list(data.FULL_IDS),
        "metric": "Dice of the 512-px mask against the letterboxed full-size mask, pooled",
        "loader_rule": f"brightest channel > {data.LOWRES_MASK_LEVEL}",
        "previous_rule": "grey > 127",
        "dice": measure(args.data_root),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["dice"], indent=2))


if __name__ == "__main__":
    main()
