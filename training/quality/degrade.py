"""Controlled degradations of a gradable fundus image, with the grade they imply.

Each degradation has a severity in [0, 1]; MILD severities make an image "usable" (a reader
can still grade it), SEVERE ones "reject". The kinds follow what makes photographs
ungradable in screening: defocus, under/over-exposure, uneven illumination, haze (media
opacity), sensor noise, occlusion (eyelashes, reflections) and an off-centre field.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

GOOD, USABLE, REJECT = 0, 1, 2
MILD = (0.25, 0.5)
SEVERE = (0.75, 1.0)

Image = np.ndarray  # float32 HxWx3 in [0, 1]


def _retina(image: Image) -> Image:
    """1 inside the photographed area, 0 on the black surround (kept black by degradations)."""
    return (image.max(axis=2, keepdims=True) > 0.02).astype(np.float32)


def _blur(image: Image, severity: float, rng: np.random.Generator) -> Image:
    sigma = 0.6 + 5.5 * severity
    return ndimage.gaussian_filter(image, (sigma, sigma, 0))


def _dark(image: Image, severity: float, rng: np.random.Generator) -> Image:
    return image * (1.0 - 0.85 * severity)


def _bright(image: Image, severity: float, rng: np.random.Generator) -> Image:
    gain = 1.0 + 2.5 * severity
    return np.clip(image * gain + 0.25 * severity, 0, 1) * _retina(image)


def _uneven(image: Image, severity: float, rng: np.random.Generator) -> Image:
    side = image.shape[0]
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[:side, :side] / side - 0.5
    ramp = np.cos(angle) * xx + np.sin(angle) * yy  # -0.7..0.7
    gain = np.clip(1.0 + 1.6 * severity * ramp * 2, 0.05, 2.0)
    return np.clip(image * gain[..., None], 0, 1)


def _haze(image: Image, severity: float, rng: np.random.Generator) -> Image:
    veil = ndimage.gaussian_filter(image, (image.shape[0] / 8,) * 2 + (0,))
    mix = 0.85 * severity
    blurred = ndimage.gaussian_filter(image, (1.5 * severity,) * 2 + (0,))
    return (1 - mix) * blurred + mix * (
        veil * 0.6 + 0.25 * (image.max(axis=2, keepdims=True) > 0.02)
    )


def _noise(image: Image, severity: float, rng: np.random.Generator) -> Image:
    return np.clip(image + rng.normal(0, 0.25 * severity, image.shape).astype(np.float32), 0, 1)


def _occlusion(image: Image, severity: float, rng: np.random.Generator) -> Image:
    side = image.shape[0]
    out = image.copy()
    yy, xx = np.mgrid[:side, :side]
    for _ in range(1 + int(3 * severity)):
        cy, cx = rng.uniform(0.2, 0.8, 2) * side
        radius = side * (0.08 + 0.25 * severity) * rng.uniform(0.6, 1.0)
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
        out[blob] = rng.uniform(0.0, 0.1) if rng.random() < 0.6 else rng.uniform(0.85, 1.0)
    return out


def _off_centre(image: Image, severity: float, rng: np.random.Generator) -> Image:
    side = image.shape[0]
    shift = severity * 0.55 * side
    angle = rng.uniform(0, 2 * np.pi)
    return ndimage.shift(image, (shift * np.sin(angle), shift * np.cos(angle), 0), order=0)


DEGRADATIONS: dict[str, Callable[[Image, float, np.random.Generator], Image]] = {
    "blur": _blur,
    "dark": _dark,
    "bright": _bright,
    "uneven": _uneven,
    "haze": _haze,
    "noise": _noise,
    "occlusion": _occlusion,
    "off_centre": _off_centre,
}


def photometric_jitter(image: Image, rng: np.random.Generator) -> Image:
    """Camera variation that does not change the grade: exposure, colour balance, gamma."""
    gain = rng.uniform(0.85, 1.15, 3).astype(np.float32)
    gamma = rng.uniform(0.85, 1.15)
    out = np.clip(image * gain, 0, 1) ** gamma
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(np.rot90(out, rng.integers(4)) if rng.random() < 0.3 else out)


def degrade(image: Image, grade: int, rng: np.random.Generator) -> Image:
    """A version of a gradable image that deserves `grade`."""
    image = photometric_jitter(image, rng)
    if grade == GOOD:
        return image
    low, high = MILD if grade == USABLE else SEVERE
    kinds = rng.choice(
        list(DEGRADATIONS), size=1 if grade == USABLE else rng.integers(1, 3), replace=False
    )
    for kind in kinds:
        image = DEGRADATIONS[str(kind)](image, float(rng.uniform(low, high)), rng)
    return image.astype(np.float32)
