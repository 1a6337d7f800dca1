"""`generate_fundus`: a fundus-like colour image and the exact truth it was drawn from.

For tests and the demo only (never a stand-in for real data in benchmarks). Every random draw
comes from the seed, through independent streams per component, so the same seed gives the
same bytes and adding lesions leaves the vessel tree unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from shared.findings import Laterality, LesionType
from shared.synthetic.anatomy import DiscAndCup, Layout, disc_and_cup, make_layout
from shared.synthetic.geometry import BoolArray, polyline_pixels
from shared.synthetic.lesions import SyntheticLesion, place_lesions
from shared.synthetic.spec import SyntheticFundusSpec
from shared.synthetic.vessels import VesselSegment, grow_vessel_tree

# Linear RGB in [0, 1]: an orange-red fundus, a yellowish disc with a paler cup, arteries
# lighter red than veins (all vessels darker than the fundus, most on green).
_FUNDUS_RGB = np.array([0.80, 0.36, 0.16], dtype=np.float32)
_DISC_RGB = np.array([0.97, 0.78, 0.48], dtype=np.float32)
_CUP_RGB = np.array([1.00, 0.92, 0.72], dtype=np.float32)
_VESSEL_RGB = {
    "artery": np.array([0.66, 0.14, 0.09], dtype=np.float32),
    "vein": np.array([0.42, 0.06, 0.08], dtype=np.float32),
}
# Per lesion type: colour, opacity at the centre, opacity lost towards the outline.
_LESION_STYLE: dict[LesionType, tuple[tuple[float, float, float], float, float]] = {
    LesionType.MICROANEURYSM: ((0.45, 0.05, 0.04), 0.9, 0.3),
    LesionType.HAEMORRHAGE: ((0.50, 0.07, 0.05), 0.9, 0.3),
    LesionType.HARD_EXUDATE: ((0.96, 0.86, 0.36), 0.95, 0.2),
    LesionType.SOFT_EXUDATE: ((0.93, 0.90, 0.80), 0.8, 0.6),  # fluffy: fades to the edge
}
_TEXTURE_GRID = 9  # coarse random field upsampled into slow background variation
_TEXTURE_AMPLITUDE = 0.05
_MACULA_SIGMA_DD = 0.6
_MACULA_DEPTH = np.array([0.30, 0.45, 0.45], dtype=np.float32)


@dataclass(frozen=True)
class VesselLayers:
    """Rasterised vessels. Where tubes overlap, a pixel belongs to the nearest centreline."""

    vessel_mask: BoolArray
    artery_mask: BoolArray  # arteries and veins may both be True at a crossing
    vein_mask: BoolArray
    width_map: NDArray[np.float32]  # true width of the owning segment, 0 off vessels
    segment_index_map: NDArray[np.int32]  # index of the owning segment, -1 off vessels
    centre_distance: NDArray[np.float32]  # distance to the owning centreline, inf off vessels


@dataclass(frozen=True)
class SyntheticFundus:
    """The image and its truth. Points are (x, y) px with pixel centres on integers."""

    spec: SyntheticFundusSpec
    seed: int
    rgb: NDArray[np.uint8]  # (H, W, 3)
    fov_mask: BoolArray
    fov_center: tuple[float, float]
    fov_radius: float
    vessel_mask: BoolArray
    artery_mask: BoolArray
    vein_mask: BoolArray
    vessel_width_map: NDArray[np.float32]
    segment_index_map: NDArray[np.int32]
    centrelines: list[VesselSegment]
    disc_mask: BoolArray
    cup_mask: BoolArray
    disc_center: tuple[float, float]
    disc_radius_px: float
    cup_center: tuple[float, float]
    cup_radius_v: float  # semi-axes of the drawn cup ellipse
    cup_radius_h: float
    disc_height_px: int  # rows / columns spanned by the masks
    disc_width_px: int
    cup_height_px: int
    cup_width_px: int
    cdr_vertical: float  # as asked in the spec
    cdr_horizontal: float
    cdr_vertical_drawn: float  # cup_height_px / disc_height_px: what a perfect segmenter finds
    cdr_horizontal_drawn: float
    fovea_center: tuple[float, float]
    laterality: Laterality
    lesions: list[SyntheticLesion]

    @property
    def disc_diameter_px(self) -> float:
        return 2.0 * self.disc_radius_px

    def truth(self) -> dict[str, Any]:
        """The ground truth as JSON-ready data (masks excluded)."""
        return {
            "seed": self.seed,
            "spec": self.spec.model_dump(mode="json"),
            "size": self.spec.size,
            "laterality": self.laterality.value,
            "fov": {"center": list(self.fov_center), "radius": self.fov_radius},
            "disc": {
                "center": list(self.disc_center),
                "radius_px": self.disc_radius_px,
                "height_px": self.disc_height_px,
                "width_px": self.disc_width_px,
                "cup_center": list(self.cup_center),
                "cup_radius_v": self.cup_radius_v,
                "cup_radius_h": self.cup_radius_h,
                "cup_height_px": self.cup_height_px,
                "cup_width_px": self.cup_width_px,
                "cdr_vertical": self.cdr_vertical,
                "cdr_horizontal": self.cdr_horizontal,
                "cdr_vertical_drawn": self.cdr_vertical_drawn,
                "cdr_horizontal_drawn": self.cdr_horizontal_drawn,
            },
            "fovea": {"center": list(self.fovea_center)},
            "vessels": {
                "pixels": int(self.vessel_mask.sum()),
                "segments": [_segment_truth(s) for s in self.centrelines],
            },
            "lesions": [
                {
                    "type": les.type.value,
                    "center": list(les.center),
                    "radius": les.radius,
                    "box_px": list(les.box_px),
                    "box_norm": list(les.box_norm),
                    "area_px": les.area_px,
                }
                for les in self.lesions
            ],
        }


def _segment_truth(seg: VesselSegment) -> dict[str, Any]:
    return {
        "index": seg.index,
        "kind": seg.kind,
        "generation": seg.generation,
        "width_px": seg.width_px,
        "arc_length": seg.arc_length,
        "chord_length": seg.chord_length,
        "distance_tortuosity": seg.distance_tortuosity,
        "parent": seg.parent,
        "children": list(seg.children),
        "points": np.round(seg.points, 2).tolist(),
    }


def generate_fundus(spec: SyntheticFundusSpec | None = None, seed: int = 0) -> SyntheticFundus:
    """Draw a fundus from `spec` (default: SyntheticFundusSpec()) with the given seed."""
    spec = spec or SyntheticFundusSpec()
    vessel_rng, lesion_rng, texture_rng, noise_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
    )
    layout = make_layout(spec)
    shape = (spec.size, spec.size)
    disc = disc_and_cup(spec, layout)
    segments = grow_vessel_tree(spec, layout, vessel_rng)
    vessels = draw_vessels(segments, shape)
    lesions = place_lesions(spec, layout, lesion_rng)
    fov_mask = _fov_mask(layout)

    rgb = _background(layout, texture_rng)
    _paint_disc(rgb, disc, layout)
    _paint_vessels(rgb, vessels, segments)
    for lesion in lesions:
        _paint_lesion(rgb, lesion)
    rgb = _expose(rgb, spec, layout, fov_mask, noise_rng)

    return SyntheticFundus(
        spec=spec,
        seed=seed,
        rgb=rgb,
        fov_mask=fov_mask,
        fov_center=layout.fov_center,
        fov_radius=layout.fov_radius,
        vessel_mask=vessels.vessel_mask,
        artery_mask=vessels.artery_mask,
        vein_mask=vessels.vein_mask,
        vessel_width_map=vessels.width_map,
        segment_index_map=vessels.segment_index_map,
        centrelines=segments,
        disc_mask=disc.disc_mask,
        cup_mask=disc.cup_mask,
        disc_center=layout.disc_center,
        disc_radius_px=layout.disc_radius,
        cup_center=disc.cup_center,
        cup_radius_v=disc.cup_radius_v,
        cup_radius_h=disc.cup_radius_h,
        disc_height_px=disc.disc_height_px,
        disc_width_px=disc.disc_width_px,
        cup_height_px=disc.cup_height_px,
        cup_width_px=disc.cup_width_px,
        cdr_vertical=spec.cdr_vertical,
        cdr_horizontal=spec.cdr_horizontal_value,
        cdr_vertical_drawn=disc.cup_height_px / disc.disc_height_px,
        cdr_horizontal_drawn=disc.cup_width_px / disc.disc_width_px,
        fovea_center=layout.fovea_center,
        laterality=spec.laterality,
        lesions=lesions,
    )


def draw_vessels(segments: list[VesselSegment], shape: tuple[int, int]) -> VesselLayers:
    """Each segment is the pixels within width/2 of its polyline (exact, no anti-aliasing)."""
    distance = np.full(shape, np.inf, dtype=np.float32)
    owner = np.full(shape, -1, dtype=np.int32)
    artery = np.zeros(shape, dtype=bool)
    vein = np.zeros(shape, dtype=bool)
    for seg in segments:
        px = polyline_pixels(seg.points, seg.width_px / 2.0, shape)
        (artery if seg.kind == "artery" else vein)[px.rows, px.cols] = True
        nearer = px.dist < distance[px.rows, px.cols]
        rows, cols = px.rows[nearer], px.cols[nearer]
        distance[rows, cols] = px.dist[nearer]
        owner[rows, cols] = seg.index
    widths = np.array([0.0] + [s.width_px for s in segments], dtype=np.float32)
    return VesselLayers(
        vessel_mask=owner >= 0,
        artery_mask=artery,
        vein_mask=vein,
        width_map=widths[owner + 1],
        segment_index_map=owner,
        centre_distance=distance,
    )


def _fov_mask(layout: Layout) -> BoolArray:
    yy, xx = np.ogrid[0 : layout.size, 0 : layout.size]
    cx, cy = layout.fov_center
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= layout.fov_radius**2


def _background(layout: Layout, rng: np.random.Generator) -> NDArray[np.float32]:
    """Fundus colour with slow texture and a darker macula, (H, W, 3) float32 in [0, 1]."""
    coarse = rng.normal(size=(_TEXTURE_GRID, _TEXTURE_GRID))
    texture = ndimage.zoom(coarse, layout.size / _TEXTURE_GRID, order=3)[
        : layout.size, : layout.size
    ]
    yy, xx = np.ogrid[0 : layout.size, 0 : layout.size]
    fx, fy = layout.fovea_center
    sigma = _MACULA_SIGMA_DD * layout.disc_diameter
    macula = np.exp(-((xx - fx) ** 2 + (yy - fy) ** 2) / (2.0 * sigma**2)).astype(np.float32)
    shade = (1.0 + _TEXTURE_AMPLITUDE * texture).astype(np.float32)[..., None]
    return _FUNDUS_RGB * shade * (1.0 - _MACULA_DEPTH * macula[..., None])


def _paint_disc(rgb: NDArray[np.float32], disc: DiscAndCup, layout: Layout) -> None:
    """Disc brighter towards its centre, cup paler still."""
    rows, cols = np.nonzero(disc.disc_mask)
    r = np.hypot(cols - layout.disc_center[0], rows - layout.disc_center[1]) / layout.disc_radius
    rgb[rows, cols] = _DISC_RGB * (1.0 - 0.12 * r)[:, None].astype(np.float32)
    rgb[disc.cup_mask] = _CUP_RGB


def _paint_vessels(
    rgb: NDArray[np.float32], vessels: VesselLayers, segments: list[VesselSegment]
) -> None:
    """Blend the vessel colour in, most opaque on the centreline (the column of blood is
    thickest there), so the image looks tubular while the mask keeps its exact edge."""
    rows, cols = np.nonzero(vessels.vessel_mask)
    owners = vessels.segment_index_map[rows, cols]
    half = vessels.width_map[rows, cols] / 2.0
    rel = np.clip(vessels.centre_distance[rows, cols] / half, 0.0, 1.0)
    alpha = (0.7 + 0.25 * (1.0 - rel**2))[:, None]
    is_artery = np.array([s.kind == "artery" for s in segments])[owners]
    colour = np.where(is_artery[:, None], _VESSEL_RGB["artery"], _VESSEL_RGB["vein"])
    rgb[rows, cols] = (1.0 - alpha) * rgb[rows, cols] + alpha * colour


def _paint_lesion(rgb: NDArray[np.float32], lesion: SyntheticLesion) -> None:
    colour, centre_alpha, falloff = _LESION_STYLE[lesion.type]
    x0, y0, x1, y1 = lesion.box_px
    patch = rgb[y0:y1, x0:x1]
    alpha = centre_alpha * (1.0 - falloff * lesion.norm_radius**2)
    alpha = np.where(lesion.mask, alpha, 0.0).astype(np.float32)[..., None]
    patch[...] = (1.0 - alpha) * patch + alpha * np.array(colour, dtype=np.float32)


def _expose(
    rgb: NDArray[np.float32],
    spec: SyntheticFundusSpec,
    layout: Layout,
    fov_mask: BoolArray,
    rng: np.random.Generator,
) -> NDArray[np.uint8]:
    """Camera: vignetting, optical blur, sensor noise, black outside the field of view."""
    yy, xx = np.ogrid[0 : layout.size, 0 : layout.size]
    cx, cy = layout.fov_center
    rim = ((xx - cx) ** 2 + (yy - cy) ** 2) / layout.fov_radius**2
    rgb = rgb * (1.0 - spec.vignetting * np.minimum(rim, 1.0)).astype(np.float32)[..., None]
    if spec.blur_sigma_px > 0:
        rgb = ndimage.gaussian_filter(rgb, sigma=(spec.blur_sigma_px, spec.blur_sigma_px, 0))
    out = rgb * 255.0
    if spec.noise_std > 0:
        out = out + rng.normal(0.0, spec.noise_std, out.shape).astype(np.float32)
    out[~fov_mask] = 0.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
