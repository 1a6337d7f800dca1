"""Overlay PNGs drawn on the analysed (FOV-cropped) image.

Layers: "vessels" (arteries red, veins blue), "disc" (disc and cup outlines), "zones"
(AutoMorph's zones B and C), "fovea" (a cross), and "combined" (all of them).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

LAYERS = ("vessels", "disc", "zones", "fovea", "combined")
ARTERY_RGB = (230, 40, 40)
VEIN_RGB = (40, 90, 240)
UNCLASSIFIED_RGB = (250, 250, 250)
DISC_RGB = (40, 230, 80)
CUP_RGB = (250, 220, 40)
ZONE_RGB = (255, 255, 255)
FOVEA_RGB = (255, 80, 255)


@dataclass(frozen=True)
class OverlayInputs:
    rgb: np.ndarray  # uint8 H x W x 3
    vessel_labels: np.ndarray | None = None  # 0 none, 1 artery, 2 vein, 3 vessel of no class
    disc: np.ndarray | None = None  # bool H x W
    cup: np.ndarray | None = None
    zone_center: tuple[float, float] | None = None
    zone_radius: float | None = None  # r of AutoMorph's zones: B = 2r..3r, C = 2r..5r
    fovea: tuple[float, float] | None = None


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, iterations=2)


def _paint_vessels(canvas: np.ndarray, labels: np.ndarray) -> None:
    for label, colour in ((1, ARTERY_RGB), (2, VEIN_RGB), (3, UNCLASSIFIED_RGB)):
        canvas[labels == label] = colour


def _paint_disc(canvas: np.ndarray, disc: np.ndarray | None, cup: np.ndarray | None) -> None:
    if disc is not None:
        canvas[_outline(disc)] = DISC_RGB
    if cup is not None:
        canvas[_outline(cup)] = CUP_RGB


def _draw_circles(image: Image.Image, center: tuple[float, float], radii: list[float]) -> None:
    draw = ImageDraw.Draw(image)
    width = max(1, round(min(image.size) / 300))
    for radius in radii:
        x, y = center
        draw.ellipse(
            (x - radius, y - radius, x + radius, y + radius), outline=ZONE_RGB, width=width
        )


def _draw_cross(image: Image.Image, point: tuple[float, float]) -> None:
    draw = ImageDraw.Draw(image)
    size = max(6, round(min(image.size) / 40))
    width = max(2, round(min(image.size) / 250))
    x, y = point
    draw.line((x - size, y, x + size, y), fill=FOVEA_RGB, width=width)
    draw.line((x, y - size, x, y + size), fill=FOVEA_RGB, width=width)


def render(inputs: OverlayInputs, layer: str) -> bytes:
    """One overlay layer as PNG bytes; ValueError for an unknown layer."""
    if layer not in LAYERS:
        raise ValueError(f"unknown overlay layer {layer!r}; known: {', '.join(LAYERS)}")
    combined = layer == "combined"
    canvas = inputs.rgb.copy()
    if (combined or layer == "vessels") and inputs.vessel_labels is not None:
        _paint_vessels(canvas, inputs.vessel_labels)
    if combined or layer == "disc":
        _paint_disc(canvas, inputs.disc, inputs.cup)
    image = Image.fromarray(canvas)
    if (combined or layer == "zones") and inputs.zone_center and inputs.zone_radius:
        r = inputs.zone_radius
        _draw_circles(image, inputs.zone_center, [2 * r, 3 * r, 5 * r])
    if (combined or layer == "fovea") and inputs.fovea is not None:
        _draw_cross(image, inputs.fovea)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=3)
    return buffer.getvalue()
