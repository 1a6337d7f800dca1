"""Box-counting (Minkowski-Bouligand) fractal dimension of a binary mask."""

from __future__ import annotations

import numpy as np

from services.analysis.features.skeleton import BoolArray

MIN_BOX = 4  # px: AutoMorph's smallest box
# Largest box: a quarter of the shorter side, rounded down to a power of two (128 px at
# 912). AutoMorph's 256 and 512 px boxes tile a 912 grid 4x4 and 2x2: every one of them
# holds some vessel in any fundus, so they measure the frame, not the tree, and pull the
# slope towards 2.
MAX_BOX_FRACTION = 4


def box_counting_dimension(mask: BoolArray) -> float | None:
    """Slope of log(occupied boxes) against log(1 / box size), boxes of 4, 8, ... px.

    A box counts when it holds any mask pixel (AutoMorph counts only partly filled boxes,
    which gives a filled square a dimension of 1). Boxes tile the image from its top-left
    corner; one cut by the far edges counts for the fraction of it inside the image, so the
    filled square and the straight line come out at exactly 2 and 1 on any canvas size.
    None for an empty mask or a canvas too small for two box sizes.
    """
    height, width = mask.shape
    max_box = MIN_BOX
    while max_box * 2 * MAX_BOX_FRACTION <= min(height, width):
        max_box *= 2
    if max_box == MIN_BOX or not mask.any():
        return None
    sizes = MIN_BOX * 2 ** np.arange(int(np.log2(max_box // MIN_BOX)) + 1)
    rows, cols = -(-height // max_box) * max_box, -(-width // max_box) * max_box
    padded = np.zeros((rows, cols), dtype=bool)
    padded[:height, :width] = mask
    # 4-column groups read as one 32-bit word each (MIN_BOX == 4): non-zero iff any is set.
    words = padded.view(np.uint32)
    occupied = (words[0::4] | words[1::4] | words[2::4] | words[3::4]) != 0
    counts = []
    for level, size in enumerate(sizes):
        if level:
            r, c = occupied.shape
            occupied = occupied.reshape(r // 2, 2, c // 2, 2).any(axis=(1, 3))
        counts.append(_weighted_count(occupied, int(size), height, width))
    slope = np.polyfit(np.log(sizes), np.log(counts), 1)[0]
    return float(-slope)


def _weighted_count(occupied: BoolArray, size: int, height: int, width: int) -> float:
    """Occupied boxes, each weighted by the fraction of its area inside the image."""
    row_part = np.clip(height - size * np.arange(occupied.shape[0]), 0, size) / size
    col_part = np.clip(width - size * np.arange(occupied.shape[1]), 0, size) / size
    return float(row_part @ occupied @ col_part)
