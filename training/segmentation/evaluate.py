"""Vessel and artery/vein metrics, shared by training's export and bench/vessels.py.

Vessel metrics are pooled over all FOV pixels of a set (one confusion matrix, one ROC), the
usual way DRIVE results are reported; the mean and spread of per-image Dice are given too.
A/V metrics count the reference's artery and vein pixels only (crossings / uncertain and
background excluded), whatever the predicted vessel map says, as the A/V literature does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from services.analysis.engine.vessels import VesselSegmenter
from training.segmentation.datasets import Sample, read_av, read_fov, read_rgb, read_vessel

THRESHOLD_GRID = np.round(np.arange(0.20, 0.80, 0.01), 2)


@dataclass(frozen=True)
class Scored:
    """Probabilities and references of one image, restricted to its evaluation pixels."""

    image_id: str
    probability: np.ndarray  # float32, 1-D
    reference: np.ndarray  # bool, 1-D


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties)."""
    ranks = rankdata(scores)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(predicted: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    tp = int(np.count_nonzero(predicted & reference))
    fp = int(np.count_nonzero(predicted & ~reference))
    fn = int(np.count_nonzero(~predicted & reference))
    tn = predicted.size - tp - fp - fn
    return {
        "dice": 2 * tp / max(1, 2 * tp + fp + fn),
        "sensitivity": tp / max(1, tp + fn),
        "specificity": tn / max(1, tn + fp),
        "accuracy": (tp + tn) / max(1, predicted.size),
    }


def score_vessels(segmenter: VesselSegmenter, samples: list[Sample]) -> list[Scored]:
    """Run the serving path on each image; keep FOV pixels (dataset masks, or threshold)."""
    scored = []
    for sample in samples:
        rgb = read_rgb(sample)
        fov = read_fov(sample, rgb)
        probability = segmenter.predict(rgb).vessel
        reference = read_vessel(sample.vessel)
        scored.append(Scored(sample.image_id, probability[fov], reference[fov]))
    return scored


def best_threshold(scored: list[Scored]) -> float:
    """The threshold with the best pooled Dice (call on training data only)."""
    probability = np.concatenate([item.probability for item in scored])
    reference = np.concatenate([item.reference for item in scored])
    dices = [binary_metrics(probability >= t, reference)["dice"] for t in THRESHOLD_GRID]
    return float(THRESHOLD_GRID[int(np.argmax(dices))])


def vessel_report(scored: list[Scored], threshold: float) -> dict[str, object]:
    probability = np.concatenate([item.probability for item in scored])
    reference = np.concatenate([item.reference for item in scored])
    per_image = [
        binary_metrics(item.probability >= threshold, item.reference)["dice"] for item in scored
    ]
    return {
        "images": len(scored),
        "threshold": threshold,
        "auc": roc_auc(probability, reference),
        **binary_metrics(probability >= threshold, reference),
        "dice_per_image_mean": float(np.mean(per_image)),
        "dice_per_image_min": float(np.min(per_image)),
        "dice_per_image": {
            item.image_id: round(d, 4) for item, d in zip(scored, per_image, strict=True)
        },
    }


def av_report(segmenter: VesselSegmenter, samples: list[Sample]) -> dict[str, object]:
    """Artery-vs-vein accuracy and F1 (artery positive) on the reference's A/V pixels."""
    predicted_parts, reference_parts, per_image = [], [], {}
    for sample in samples:
        labels = read_av(sample)
        keep = (labels == 1) | (labels == 2)
        artery = segmenter.predict(read_rgb(sample)).artery[keep] >= 0.5
        reference = labels[keep] == 1
        predicted_parts.append(artery)
        reference_parts.append(reference)
        per_image[sample.image_id] = round(float(np.mean(artery == reference)), 4)
    predicted = np.concatenate(predicted_parts)
    reference = np.concatenate(reference_parts)
    artery_scores = binary_metrics(predicted, reference)
    vein_scores = binary_metrics(~predicted, ~reference)
    return {
        "images": len(samples),
        "pixels": int(reference.size),
        "accuracy": artery_scores["accuracy"],
        "artery_f1": artery_scores["dice"],
        "vein_f1": vein_scores["dice"],
        "artery_sensitivity": artery_scores["sensitivity"],
        "vein_sensitivity": artery_scores["specificity"],
        "accuracy_per_image_mean": float(np.mean(list(per_image.values()))),
        "accuracy_per_image": per_image,
    }
