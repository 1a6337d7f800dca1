"""Lesion masks and overlays as PNG.

`mask_png`: one type's 0/255 mask (what DetectResponse.masks and the CLI's `--save-masks`
carry). `render`: the photograph with each type's mask tinted and its boxes outlined, for one
type ("ma", "he", "ex", "se") or all of them ("lesions"). Colours follow IDRiD's colour masks
(MA white, HE red, EX blue, SE green).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from services.lesion.engine.detector import SHORT_NAMES
from services.lesion.engine.instances import Instance
from shared.findings import LesionType

LAYERS = (*SHORT_NAMES.values(), "lesions")
COLOURS = {
    LesionType.MICROANEURYSM: (255, 255, 255),
    LesionType.HAEMORRHAGE: (255, 40, 40),
    LesionType.HARD_EXUDATE: (60, 120, 255),
    LesionType.SOFT_EXUDATE: (40, 230, 80),
}
_TINT = 0.55  # mask opacity over the photograph


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=3)
    return buffer.getvalue()


def mask_png(mask: np.ndarray) -> bytes:
    """bool H x W -> 8-bit greyscale PNG, 0 background, 255 lesion."""
    return _png(Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)))


def layer_types(layer: str) -> list[LesionType]:
    """The lesion types a layer shows; ValueError for an unknown layer."""
    if layer == "lesions":
        return list(SHORT_NAMES)
    for lesion_type, short in SHORT_NAMES.items():
        if short == layer:
            return [lesion_type]
    raise ValueError(f"unknown lesion layer {layer!r}; known: {', '.join(LAYERS)}")


def render(
    rgb: np.ndarray,
    masks: Mapping[LesionType, np.ndarray],
    instances: Sequence[Instance],
    layer: str,
) -> bytes:
    """The overlay PNG of `layer`; masks and instance boxes are in the rgb's pixels."""
    shown = layer_types(layer)
    canvas = rgb.astype(np.float32)
    for lesion_type in shown:
        mask = masks.get(lesion_type)
        if mask is not None:
            colour = np.array(COLOURS[lesion_type], dtype=np.float32)
            canvas[mask] = (1 - _TINT) * canvas[mask] + _TINT * colour
    image = Image.fromarray(canvas.round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    width = max(1, round(min(image.size) / 400))
    for instance in instances:
        if instance.type in shown:
            x0, y0, x1, y1 = instance.box
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=COLOURS[instance.type], width=width)
    return _png(image)
