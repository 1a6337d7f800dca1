"""Per-pixel lesion probabilities (MA, HE, EX, SE) from a fundus photograph.

The image goes onto the working grid (`preprocess.py`), then through a 4-output `VesselUNet`
(the analysis service's compact U-Net, built here with four sigmoid outputs) in overlapping
tiles: each tile's border, where the convolutions saw padding, is discarded. With
`test_time_flips` 2 or 4 (the manifest's choice, measured by bench/lesions.py) the pass is
repeated on the mirrored image (and upside down) and the probabilities averaged. With
`test_time_scales` (also the manifest's, per type) it is repeated on other grids: coarser ones,
e.g. 0.75 times as fine, where each tile sees more of the photograph (large haemorrhages and
cotton-wool spots whole), or finer ones, where a microaneurysm is wider. Each type averages
the maps of its own grids, resized back onto the working grid; each grid is computed once,
whichever types use it, and a finer grid that would enlarge the photograph more than
MAX_UPSCALE times is skipped (it adds no detail, only time). A context model (the manifest's
`context`) is a second network of the same kind trained on a grid a quarter as fine
(`training.lesions.train --grid-scale 0.25`), where a whole haemorrhage sheet fits in one tile;
for the types the manifest gives it a share of, the maps are a weighted mean of the two
networks'. On CPUs with native bf16
(AVX512-BF16 / AMX) the pass runs under bf16 autocast with channels-last memory, as the vessel
network does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

from services.analysis.engine.model_files import manifest_path
from services.analysis.engine.runtime import NetRunner
from services.lesion.engine.preprocess import MAX_UPSCALE, WorkGrid, resample, standardise
from shared.findings import LESION_SHORT_NAMES, LesionType
from shared.imaging.fov import FovEstimate, detect_field_of_view

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "lesion-unet.safetensors"
CONTEXT_WEIGHTS = WEIGHTS_DIR / "lesion-context-unet.safetensors"  # the served context model
TASK = "lesion-segmentation"
# Output channel order of the network.
TYPES = (
    LesionType.MICROANEURYSM,
    LesionType.HAEMORRHAGE,
    LesionType.HARD_EXUDATE,
    LesionType.SOFT_EXUDATE,
)
SHORT_NAMES = LESION_SHORT_NAMES
NAMES = tuple(SHORT_NAMES[t] for t in TYPES)  # short names in output order
TILE = 1024  # most working px per tile side, margin included (bounds the memory of a pass)
MARGIN = 32  # px of each tile border discarded (the U-Net's padding effects)
FLIP_DIMS = ((), (3,), (2,), (2, 3))  # identity, mirrored, upside down, both: the first N run
SINGLE_PASS = (1.0,)  # test_time_scales of one pass on the working grid, for every type


@dataclass(frozen=True)
class LesionMaps:
    """Probabilities on the working grid and the grid's place in the input image."""

    probabilities: np.ndarray  # float32 4 x h x w in TYPES order, 0 outside the FOV
    grid: WorkGrid


TestTimeScales = Sequence[float] | Mapping[str, Sequence[float]]


def scales_per_type(chosen: TestTimeScales) -> dict[str, tuple[float, ...]]:
    """Test-time scales for every type, or per type by short name -> each short name's scales
    (1.0 first, each in 0.25..2; (1.0,) for a type a mapping leaves out)."""
    if isinstance(chosen, Mapping):
        unknown = set(chosen) - set(NAMES)
        if unknown:
            raise ValueError(f"test_time_scales names unknown lesion types {sorted(unknown)}")
        out = {name: tuple(float(f) for f in chosen.get(name, (1.0,))) for name in NAMES}
    else:
        out = dict.fromkeys(NAMES, tuple(float(f) for f in chosen))
    for name, scales in out.items():
        if not scales or scales[0] != 1.0 or not all(0.25 <= f <= 2 for f in scales):
            raise ValueError(
                f"test_time_scales must start at 1.0, each in 0.25..2, not {scales} ({name})"
            )
    return out


def shares_per_type(shares: Mapping[str, float]) -> dict[str, float]:
    """A context model's share of each type's map (short names; a type left out: 0)."""
    unknown = set(shares) - set(NAMES)
    if unknown:
        raise ValueError(f"context shares name unknown lesion types {sorted(unknown)}")
    out = {name: float(shares.get(name, 0.0)) for name in NAMES}
    if not all(0.0 <= share <= 1.0 for share in out.values()):
        raise ValueError(f"context shares must lie in 0..1, not {out}")
    return out


def within_upscale(scales: tuple[float, ...], grid: WorkGrid) -> tuple[float, ...]:
    """The scales whose grid enlarges the photograph at most MAX_UPSCALE times (1.0 always)."""
    return tuple(f for f in scales if f <= 1.0 or grid.scale * f <= MAX_UPSCALE)


def tiles(length: int, tile: int, margin: int) -> Iterator[tuple[int, int, int, int]]:
    """(read_start, read_end, keep_start, keep_end) windows covering 0..length on one axis.

    As few windows of at most `tile` as will do, of equal size, overlapping by 2 * margin, so
    every kept pixel is at least `margin` from a window border (except at the image's own
    borders) and little is computed twice.
    """
    if length <= tile:
        yield 0, length, 0, length
        return
    count = math.ceil((length - 2 * margin) / (tile - 2 * margin))
    size = math.ceil((length + 2 * margin * (count - 1)) / count)
    for k in range(count):
        start = min(k * (size - 2 * margin), length - size)
        keep_start = 0 if k == 0 else start + margin
        keep_end = length if k == count - 1 else start + size - margin
        yield start, start + size, keep_start, keep_end


def flipped(tensor: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """`tensor` reversed along `dims`; itself for none (torch's flip copies even then)."""
    return tensor.flip(list(dims)) if dims else tensor


class LesionDetector(NetRunner):
    """A loaded lesion network, ready to run on photographs."""

    TASK = TASK
    DEFAULT_WEIGHTS = DEFAULT_WEIGHTS

    def __init__(
        self,
        *args: Any,
        test_time_flips: int | None = None,
        test_time_scales: TestTimeScales | None = None,
        context: LesionDetector | None = None,
        context_shares: Mapping[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """`test_time_flips`: how many of FLIP_DIMS each pass averages; `test_time_scales`:
        the working grid's refinements whose maps are averaged, 1.0 first, for every type or
        per type (short names; a type left out keeps (1.0,)). None: the manifest's choices, 1
        flip and (1.0,) when it has none. `context`: a context model, whose maps weigh
        `context_shares` per type (None: the manifest's `context.shares`)."""
        super().__init__(*args, **kwargs)
        # The grid this network was trained on, relative to the working grid (a context model's
        # is coarser; training.lesions.train --grid-scale).
        self.grid_scale = float(self.manifest["architecture"].get("grid_scale", 1.0))
        self.context = context
        self.context_shares = shares_per_type(
            context_shares or self.manifest.get("context", {}).get("shares", {}) if context else {}
        )
        self.test_time_flips = test_time_flips or int(self.manifest.get("test_time_flips", 1))
        if self.test_time_flips not in (1, 2, 4):
            raise ValueError(f"test_time_flips must be 1, 2 or 4, not {self.test_time_flips}")
        self.test_time_scales = scales_per_type(
            test_time_scales or self.manifest.get("test_time_scales", (1.0,))
        )

    @classmethod
    def load(
        cls,
        weights: Path | None = None,
        *,
        context_weights: Path | None = None,
        context_shares: Mapping[str, float] | None = None,
        **options: Any,
    ) -> Self:
        """NetRunner.load, with the context model at `context_weights` (None: the one the
        manifest names, `context.weights`, a file beside `weights`) on the same device and
        threads. The context model has no int8 file: where this one runs int8, it runs as
        "auto" picks."""
        weights = weights or cls.DEFAULT_WEIGHTS
        manifest = manifest_path(weights)
        if context_weights is None and manifest.is_file():  # else super().load says it is missing
            named = json.loads(manifest.read_text()).get("context")
            context_weights = weights.parent / named["weights"] if named else None
        context = None
        if context_weights is not None:
            shared = {k: options[k] for k in ("device", "engine", "threads") if k in options}
            precision = options.get("precision", "auto")
            context = super().load(
                context_weights, precision="auto" if precision == "int8" else precision, **shared
            )
        return super().load(weights, context=context, context_shares=context_shares, **options)

    @property
    def manifests(self) -> list[dict]:
        """This network's manifest and its context model's, if any."""
        return [self.manifest, *([self.context.manifest] if self.context else [])]

    def reported_types(self) -> tuple[LesionType, ...]:
        """The types this model reports: those its manifest lists as accurate enough on
        held-out images (`reported_types`, written by bench/lesions.py); all when unlisted."""
        listed = self.manifest.get("reported_types")
        return TYPES if listed is None else tuple(t for t in TYPES if SHORT_NAMES[t] in listed)

    def thresholds(self) -> dict[LesionType, float]:
        """Probability thresholds of the reported types, chosen on held-out images (0.5 when
        the manifest has none)."""
        chosen = self.manifest.get("thresholds", {})
        return {t: float(chosen.get(SHORT_NAMES[t], 0.5)) for t in self.reported_types()}

    def probabilities(self, inputs: torch.Tensor) -> torch.Tensor:
        """1 x 6 x h x w network input -> 4 x h x w float32 probabilities, averaged over the
        first `test_time_flips` of FLIP_DIMS."""
        maps = [
            flipped(self.tiled(flipped(inputs, dims)), [d - 1 for d in dims])
            for dims in FLIP_DIMS[: self.test_time_flips]
        ]
        return maps[0] if len(maps) == 1 else torch.stack(maps).mean(0)

    def tiled(self, inputs: torch.Tensor) -> torch.Tensor:
        """1 x 6 x h x w network input -> 4 x h x w float32 probabilities, tiled."""
        _, _, height, width = inputs.shape
        multiple = self.net.multiple
        out = torch.zeros(len(TYPES), height, width)
        for ys, ye, ks_y, ke_y in tiles(height, TILE, MARGIN):
            for xs, xe, ks_x, ke_x in tiles(width, TILE, MARGIN):
                window = inputs[:, :, ys:ye, xs:xe]
                pad_y = -window.shape[2] % multiple
                pad_x = -window.shape[3] % multiple
                window = torch.nn.functional.pad(window, (0, pad_x, 0, pad_y))
                probs = torch.sigmoid(self.forward(window))[0]
                out[:, ks_y:ke_y, ks_x:ke_x] = probs[
                    :, ks_y - ys : ke_y - ys, ks_x - xs : ke_x - xs
                ]
        return out

    def predict(self, image: np.ndarray, fov: FovEstimate | None = None) -> LesionMaps:
        """uint8 H x W x 3 RGB photograph (its FOV, if already known) -> lesion maps."""
        fov = fov or detect_field_of_view(image)
        grid = WorkGrid.around(fov, image.shape[1], image.shape[0])
        per_type = [within_upscale(self.test_time_scales[name], grid) for name in NAMES]
        wanted = {factor for scales in per_type for factor in scales}
        maps = {f: self.on_grid(image, grid.rescaled(f), grid.shape) for f in sorted(wanted)}
        probs = torch.stack(
            [sum(maps[f][c] for f in scales) / len(scales) for c, scales in enumerate(per_type)]
        )
        if self.context is not None:
            coarse = grid.rescaled(self.context.grid_scale)
            context = self.context.on_grid(image, coarse, grid.shape)
            shares = torch.tensor([self.context_shares[name] for name in NAMES])[:, None, None]
            probs = (1 - shares) * probs + shares * context
        probs = probs.numpy() * grid.fov_mask()
        return LesionMaps(probabilities=probs.astype(np.float32), grid=grid)

    def on_grid(self, image: np.ndarray, grid: WorkGrid, shape: tuple[int, int]) -> torch.Tensor:
        """4 x `shape` probabilities of the photograph sampled on `grid` (whose crop the
        working grid of `shape` shares), resized to `shape` when the grids differ."""
        inside = grid.fov_mask()
        inputs = torch.from_numpy(standardise(resample(image, grid), inside, grid.fov_radius))[None]
        probs = self.probabilities(inputs)
        if probs.shape[1:] == shape:
            return probs
        return torch.nn.functional.interpolate(
            probs[None], size=shape, mode="bilinear", align_corners=False
        )[0]
