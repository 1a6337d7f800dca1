"""Image-quality grade (good / usable / reject, as EyeQ) with the reasons behind it.

A small CNN, trained on controlled degradations of real fundus photographs and on
non-fundus photographs (no quality labels exist in our data: training/quality), gives the
grade. Reasons come from interpretable measures of the image (brightness, contrast,
sharpness, illumination uniformity) compared with the range seen on clean training images,
which the training run stores in the model's manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch import nn

from services.analysis.engine.model_files import ModelFiles, load_verified
from shared import findings

QUALITY_SIDE = 256
GRADES = (findings.QualityGrade.GOOD, findings.QualityGrade.USABLE, findings.QualityGrade.REJECT)
# Measure -> (reason when below the clean range, reason when above it).
MEASURE_REASONS = {
    "brightness": ("underexposed (too dark)", "overexposed (too bright)"),
    "contrast": ("low contrast (haze, media opacity or defocus)", "unusually high contrast"),
    "sharpness": ("blurred (out of focus or motion)", "unusually sharp or noisy"),
    "uniformity": ("uneven illumination", ""),
    "retina_fraction": ("little visible retina (off-centre or occluded)", ""),
}


def to_square(rgb: np.ndarray, side: int = QUALITY_SIDE) -> np.ndarray:
    """Pad to a square with black (the FOV crop is nearly square) and resize to `side`."""
    height, width = rgb.shape[:2]
    box = max(height, width)
    square = np.zeros((box, box, 3), np.uint8)
    top, left = (box - height) // 2, (box - width) // 2
    square[top : top + height, left : left + width] = rgb
    return np.array(Image.fromarray(square).resize((side, side), Image.Resampling.BILINEAR))


def to_tensor(square: np.ndarray) -> torch.Tensor:
    """Brightness is part of quality: scale to [-0.5, 0.5] without per-image standardising."""
    return torch.from_numpy(square).permute(2, 0, 1).float().div(255.0).sub(0.5)


def image_measures(square: np.ndarray) -> dict[str, float]:
    """Interpretable measures of a `to_square` image, inside its bright (retina) region."""
    luminance = square.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    retina = ndimage.binary_opening(luminance > 15, iterations=2)
    fraction = float(retina.mean())
    if retina.sum() < 100:
        return {
            "brightness": float(luminance.mean()),
            "contrast": 0.0,
            "sharpness": 0.0,
            "uniformity": 0.0,
            "retina_fraction": fraction,
        }
    inner = ndimage.binary_erosion(retina, iterations=6)
    green = square[..., 1].astype(np.float32)
    values = green[retina]
    contrast = float(values.std())
    laplace = ndimage.laplace(ndimage.gaussian_filter(green, 0.7))
    sharpness = float(np.abs(laplace[inner]).mean() / max(contrast, 1.0)) if inner.any() else 0.0
    smooth = ndimage.gaussian_filter(luminance, QUALITY_SIDE / 16)
    half = QUALITY_SIDE // 2
    quadrant_means = [
        float(smooth[rows, cols][retina[rows, cols]].mean())
        for rows in (slice(0, half), slice(half, None))
        for cols in (slice(0, half), slice(half, None))
        if retina[rows, cols].sum() > 50
    ]
    uniformity = min(quadrant_means) / max(max(quadrant_means), 1.0) if quadrant_means else 0.0
    return {
        "brightness": float(luminance[retina].mean()),
        "contrast": contrast,
        "sharpness": sharpness,
        "uniformity": float(uniformity),
        "retina_fraction": fraction,
    }


class QualityNet(nn.Module):
    """Five strided conv blocks, then average and max pooling (global blur vs local defects)."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 48, 64, 96)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * channels, len(GRADES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        return self.head(pooled)


# A measure below this fraction of its clean-range lower bound rejects the image whatever the
# network says: a photograph with (almost) no contrast or detail has nothing to grade, and the
# network has not seen every way of being empty (a flat disc, a lens cap with a logo, ...).
HARD_FLOOR = 0.5
HARD_MEASURES = ("brightness", "contrast", "sharpness", "retina_fraction")


def hard_failures(measures: dict[str, float], normal: dict[str, list[float]]) -> list[str]:
    return [
        f"{MEASURE_REASONS[name][0]}: {name} {measures[name]:.3g} "
        f"far below the clean range (< {HARD_FLOOR * normal[name][0]:.3g})"
        for name in HARD_MEASURES
        if measures[name] < HARD_FLOOR * normal[name][0]
    ]


def reasons_for(measures: dict[str, float], normal: dict[str, list[float]]) -> list[str]:
    """Reasons for every measure outside its clean-image range [low, high]."""
    reasons = []
    for name, (below, above) in MEASURE_REASONS.items():
        low, high = normal[name]
        value = measures[name]
        if value < low and below:
            reasons.append(f"{below}: {name} {value:.3g} < {low:.3g}")
        elif value > high and above:
            reasons.append(f"{above}: {name} {value:.3g} > {high:.3g}")
    return reasons


@dataclass
class QualityGrader:
    files: ModelFiles
    net: QualityNet

    @classmethod
    def load(cls, weights: Path) -> QualityGrader:
        files = load_verified(weights)
        net = QualityNet(tuple(files.manifest["architecture"]["widths"]))
        net.load_state_dict({k: v.float() for k, v in files.state.items()})
        return cls(files=files, net=net.eval())

    @torch.inference_mode()
    def grade(self, rgb: np.ndarray) -> findings.Quality:
        square = to_square(rgb)
        probabilities = torch.softmax(self.net(to_tensor(square)[None]), dim=1)[0].tolist()
        grade = GRADES[int(np.argmax(probabilities))]
        measures = image_measures(square)
        normal = self.files.manifest["normal_ranges"]
        reasons = hard_failures(measures, normal)
        if reasons:
            grade = findings.QualityGrade.REJECT
        elif grade is not findings.QualityGrade.GOOD:
            reasons = reasons_for(measures, normal)
            if not reasons and grade is findings.QualityGrade.REJECT:
                reasons = ["does not look like a gradable colour fundus photograph"]
            elif not reasons:
                reasons = ["minor quality limitations (model judgement; no measure out of range)"]
        return findings.Quality(
            grade=grade, probabilities=[round(p, 4) for p in probabilities], reasons=reasons
        )
