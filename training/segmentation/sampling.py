"""Training images on the canonical grid, and augmented random patches drawn from them.

Images go through the serving code (`detect_field_of_view`, `CanonicalGrid`, `to_canonical`)
once; each batch then takes rotated, scaled, flipped patches with `grid_sample`, jitters the
gamma of each colour channel before standardising (the standardisation itself is serving's
`fov_statistics` + `normalize`), then perturbs the standardised channels a little, adds
noise and sometimes blur (other cameras, other focus).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from services.analysis.engine.preprocess import (
    CanonicalGrid,
    fov_statistics,
    normalize,
    to_canonical,
)
from shared.imaging.fov import detect_field_of_view
from training.segmentation.datasets import Sample, read_av, read_rgb, read_vessel

IGNORE = -100  # cross-entropy target for pixels without an artery/vein label
_STATS_PIXELS = 8192  # FOV pixels kept per image to recompute its statistics under jitter
_AV_MIN_FRACTION = 0.25  # canonical pixel counts as labelled vessel when this much is covered


@dataclass(frozen=True)
class CanonicalImage:
    """One training image on the canonical grid."""

    sample: Sample
    planes: torch.Tensor  # 5 x S x S: R, G, B (0-1), FOV (0/1), vessel target (0-1)
    av: torch.Tensor  # 1 x S x S class ids as float: 0 none, 1 artery, 2 vein, 3 ignore
    fov_pixels: torch.Tensor  # 3 x N RGB samples from the FOV
    has_vessel: bool
    has_av: bool


@dataclass(frozen=True)
class Batch:
    inputs: torch.Tensor  # B x 3 x P x P network input
    vessel: torch.Tensor  # B x 1 x P x P target (0-1)
    vessel_weight: torch.Tensor  # B x 1 x P x P: 1 where the vessel loss counts
    av: torch.Tensor  # B x P x P long: 0 artery, 1 vein, IGNORE elsewhere

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.inputs.to(device),
            self.vessel.to(device),
            self.vessel_weight.to(device),
            self.av.to(device),
        )


@dataclass(frozen=True)
class Augmentation:
    scale: tuple[float, float] = (0.8, 1.25)  # patch footprint factor (>1 zooms out)
    gamma: tuple[float, float] = (0.7, 1.4)  # per colour channel, before standardising
    channel_gain: float = 0.1  # +-, after standardising
    channel_offset: float = 0.1  # std of the offset, after standardising
    noise: float = 0.05  # max std of Gaussian noise
    blur_probability: float = 0.3
    blur_sigma: tuple[float, float] = (0.4, 1.2)


def canonical_image(sample: Sample, generator: torch.Generator) -> CanonicalImage:
    rgb = read_rgb(sample)
    grid = CanonicalGrid.around(detect_field_of_view(rgb), rgb.shape[1], rgb.shape[0])
    canonical_rgb = to_canonical(rgb, grid)
    fov = grid.fov_mask()
    vessel = (
        to_canonical(read_vessel(sample.vessel).astype(np.float32), grid)
        if sample.vessel is not None
        else torch.zeros((1, grid.side, grid.side))
    )
    labels = read_av(sample)
    av = _canonical_av(labels, grid) if labels is not None else torch.zeros_like(vessel)
    pixels = canonical_rgb[:, fov]
    keep = torch.randint(pixels.shape[1], (_STATS_PIXELS,), generator=generator)
    return CanonicalImage(
        sample=sample,
        planes=torch.cat([canonical_rgb, fov[None].float(), vessel]),
        av=av,
        fov_pixels=pixels[:, keep],
        has_vessel=sample.vessel is not None,
        has_av=labels is not None,
    )


def _canonical_av(labels: np.ndarray, grid: CanonicalGrid) -> torch.Tensor:
    """Area fractions of artery / vein / crossing on the canonical grid -> majority class."""
    onehot = np.stack([labels == code for code in (1, 2, 3)], axis=2).astype(np.float32)
    fractions = to_canonical(onehot, grid)
    covered = fractions.sum(dim=0) >= _AV_MIN_FRACTION
    return torch.where(covered, fractions.argmax(dim=0) + 1, 0).float()[None]


def sample_batch(
    images: list[CanonicalImage],
    batch: int,
    patch: int,
    generator: torch.Generator,
    augmentation: Augmentation,
) -> Batch:
    inputs, vessels, weights, avs = [], [], [], []
    for index in torch.randint(len(images), (batch,), generator=generator).tolist():
        image = images[index]
        theta = _random_affine(image, patch, generator, augmentation)
        grid = F.affine_grid(theta, [1, 1, patch, patch], align_corners=False)
        planes = F.grid_sample(image.planes[None], grid, align_corners=False)[0]
        av = F.grid_sample(image.av[None], grid, mode="nearest", align_corners=False)[0, 0]
        fov = planes[3] > 0.5
        inputs.append(_jittered_input(image, planes[:3], fov, generator, augmentation))
        vessels.append(planes[4:5])
        weights.append((fov & image.has_vessel).float()[None])
        target = torch.full(av.shape, IGNORE, dtype=torch.long)
        if image.has_av:
            target[av == 1] = 0
            target[av == 2] = 1
        avs.append(target)
    return Batch(torch.stack(inputs), torch.stack(vessels), torch.stack(weights), torch.stack(avs))


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _random_affine(
    image: CanonicalImage, patch: int, generator: torch.Generator, augmentation: Augmentation
) -> torch.Tensor:
    """1 x 2 x 3 theta: a patch centred on a random FOV pixel, rotated, scaled, maybe flipped."""
    side = image.planes.shape[-1]
    fov_indices = torch.nonzero(image.planes[3].flatten() > 0.5).flatten()
    centre = int(fov_indices[torch.randint(fov_indices.numel(), (1,), generator=generator)])
    cy, cx = divmod(centre, side)
    angle = _uniform(generator, 0.0, 2 * math.pi)
    low, high = augmentation.scale
    scale = math.exp(_uniform(generator, math.log(low), math.log(high))) * patch / side
    flip = -1.0 if float(torch.rand((), generator=generator)) < 0.5 else 1.0
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    return torch.tensor(
        [
            [
                [cos * flip, -sin, (2 * cx + 1) / side - 1],
                [sin * flip, cos, (2 * cy + 1) / side - 1],
            ]
        ],
        dtype=torch.float32,
    )


def _jittered_input(
    image: CanonicalImage,
    rgb: torch.Tensor,
    fov: torch.Tensor,
    generator: torch.Generator,
    augmentation: Augmentation,
) -> torch.Tensor:
    low, high = augmentation.gamma
    gamma = torch.exp(
        math.log(low) + (math.log(high) - math.log(low)) * torch.rand(3, 1, 1, generator=generator)
    )
    # Statistics of the whole image under the same gamma, as serving computes them.
    pixels = image.fov_pixels.clamp_min(0)[:, None, :] ** gamma
    mean, std = fov_statistics(pixels, torch.ones(pixels.shape[1:], dtype=torch.bool))
    x = normalize(rgb.clamp_min(0) ** gamma, fov, mean, std)
    gain = 1 + augmentation.channel_gain * (2 * torch.rand(3, 1, 1, generator=generator) - 1)
    offset = augmentation.channel_offset * torch.randn(3, 1, 1, generator=generator)
    noise = augmentation.noise * float(torch.rand((), generator=generator))
    x = (x * gain + offset + noise * torch.randn(x.shape, generator=generator)) * fov
    if float(torch.rand((), generator=generator)) < augmentation.blur_probability:
        x = _blur(x, _uniform(generator, *augmentation.blur_sigma))
    return x


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = math.ceil(2.5 * sigma)
    taps = torch.exp(-((torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2) / 2)
    taps = taps / taps.sum()
    channels = x.shape[0]
    rows = taps.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    x = F.conv2d(x[None], rows, padding=(0, radius), groups=channels)
    x = F.conv2d(x, rows.transpose(2, 3), padding=(radius, 0), groups=channels)
    return x[0]
