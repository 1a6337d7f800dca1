"""`measure`: every feature of a MaskSet, as findings models and as AutoMorph's CSV columns."""

from __future__ import annotations

from dataclasses import dataclass

from services.analysis.features.caliber import VesselKind, hubbard, knudtson
from services.analysis.features.disc import (
    ZONE_B,
    ZONE_C,
    DiscGeometry,
    annulus,
    centre_distance,
    disc_geometry,
)
from services.analysis.features.grid import CANONICAL_SIZE, CanonicalGrid, MaskSet
from services.analysis.features.skeleton import MAX_RADIUS, BoolArray, FloatArray
from services.analysis.features.vessels import RegionFeatures, TracedVessels, measure_region, trace
from shared.findings import (
    CaliberSummary,
    Disc,
    LengthUnit,
    Point,
    Region,
    VesselFeatures,
    VesselMeasurements,
    VesselType,
)

# AutoMorph's column names: its per-type prefixes, and the suffixes its csv_merge.py gives
# the zone tables when it joins them to the whole-image one.
TYPE_PREFIX = {VesselType.ALL: "", VesselType.ARTERY: "Artery_", VesselType.VEIN: "Vein_"}
REGION_SUFFIX = {Region.WHOLE: "", Region.ZONE_B: "_zone_b", Region.ZONE_C: "_zone_c"}
DISC_COLUMNS = {
    "Disc_height": "disc_height",
    "Disc_width": "disc_width",
    "Cup_height": "cup_height",
    "Cup_width": "cup_width",
    "CDR_vertical": "cdr_vertical",
    "CDR_horizontal": "cdr_horizontal",
}
FEATURE_COLUMNS = {
    "Fractal_dimension": "fractal_dimension",
    "Vessel_density": "vessel_density",
    "Average_width": "average_width",
    "Distance_tortuosity": "distance_tortuosity",
    "Squared_curvature_tortuosity": "squared_curvature_tortuosity",
    "Tortuosity_density": "tortuosity_density",
}
CALIBER_COLUMNS = {
    "CRAE_Hubbard": "crae_hubbard",
    "CRVE_Hubbard": "crve_hubbard",
    "AVR_Hubbard": "avr_hubbard",
    "CRAE_Knudtson": "crae_knudtson",
    "CRVE_Knudtson": "crve_knudtson",
    "AVR_Knudtson": "avr_knudtson",
}
# Ours, named in the same style.
EXTRA_FEATURE_COLUMNS = {"Vessel_count": "vessel_count", "Branching_angle": "branching_angle_deg"}
ZONES = {Region.ZONE_B: ZONE_B, Region.ZONE_C: ZONE_C}


def _automorph_columns() -> tuple[str, ...]:
    """Disc, then per region: all vessels, arteries, veins, and in the zones the calibres."""
    columns = list(DISC_COLUMNS)
    for region in Region:
        suffix = REGION_SUFFIX[region]
        columns += [f"{TYPE_PREFIX[t]}{n}{suffix}" for t in VesselType for n in FEATURE_COLUMNS]
        if region in ZONES:
            columns += [f"{n}{suffix}" for n in CALIBER_COLUMNS]
    return tuple(columns)


AUTOMORPH_COLUMNS = _automorph_columns()
EXTRA_COLUMNS: tuple[str, ...] = (
    *[
        f"{TYPE_PREFIX[t]}{n}{REGION_SUFFIX[r]}"
        for r in Region
        for t in VesselType
        for n in EXTRA_FEATURE_COLUMNS
    ],
    "Disc_center_x",
    "Disc_center_y",
    "Disc_diameter_px",
    "Fovea_x",
    "Fovea_y",
    "Pixel_size_um",
)


@dataclass(frozen=True)
class Measurements:
    """The findings parts `measure` fills, and what is needed to read their units."""

    vessels: VesselMeasurements
    disc: Disc
    fovea: Point | None
    pixel_size_um: float | None  # per pixel of the measured image; None: lengths in its px
    canonical_scale: float  # canonical-grid px per pixel of the measured image

    def columns(self) -> dict[str, float | None]:
        """AutoMorph's columns (AUTOMORPH_COLUMNS) then ours (EXTRA_COLUMNS), flat for a CSV."""
        out: dict[str, float | None] = {c: getattr(self.disc, f) for c, f in DISC_COLUMNS.items()}
        features = {(f.vessel_type, f.region): f for f in self.vessels.features}
        calibers = {c.region: c for c in self.vessels.calibers}
        for region in Region:
            suffix = REGION_SUFFIX[region]
            for vtype in VesselType:
                feature = features[(vtype, region)]
                for name, field in (FEATURE_COLUMNS | EXTRA_FEATURE_COLUMNS).items():
                    out[f"{TYPE_PREFIX[vtype]}{name}{suffix}"] = _number(getattr(feature, field))
            if region in ZONES:
                for name, field in CALIBER_COLUMNS.items():
                    out[f"{name}{suffix}"] = getattr(calibers[region], field)
        center = self.disc.center
        out["Disc_center_x"] = None if center is None else center.x
        out["Disc_center_y"] = None if center is None else center.y
        out["Disc_diameter_px"] = self.disc.disc_diameter_px
        out["Fovea_x"] = None if self.fovea is None else self.fovea.x
        out["Fovea_y"] = None if self.fovea is None else self.fovea.y
        out["Pixel_size_um"] = self.pixel_size_um
        return {c: out[c] for c in (*AUTOMORPH_COLUMNS, *EXTRA_COLUMNS)}


def _number(value: float | int | None) -> float | None:
    return None if value is None else float(value)


def measure(
    masks: MaskSet, *, pixel_size_um: float | None = None, canonical_size: int = CANONICAL_SIZE
) -> Measurements:
    """Measure every feature of `masks`.

    pixel_size_um is the size of one pixel of the masks, in micrometres: with it, lengths are
    in micrometres, without it in pixels of the masks (never of the canonical grid).
    """
    if pixel_size_um is not None and not pixel_size_um > 0:
        raise ValueError("pixel_size_um must be positive")
    grid = CanonicalGrid.for_shape(masks.shape, canonical_size)
    unit = LengthUnit.PIXEL if pixel_size_um is None else LengthUnit.MICROMETER
    per_px = 1.0 if pixel_size_um is None else pixel_size_um
    per_canonical = per_px / grid.scale
    geometry = disc_geometry(masks.disc, masks.cup)
    zones, width_region = _zones(grid, geometry)
    # Segment widths serve CRAE / CRVE only: arteries and veins, in the zones.
    traced = {
        VesselType.ALL: trace(grid.resample(masks.vessel)),
        VesselType.ARTERY: _trace(grid, masks.artery, width_region),
        VesselType.VEIN: _trace(grid, masks.vein, width_region),
    }
    results = {
        (vtype, region): _region(traced[vtype], region, zones)
        for region in Region
        for vtype in VesselType
    }
    features = [
        _vessel_features(vtype, region, result, per_canonical)
        for (vtype, region), result in results.items()
    ]
    calibers = [
        _caliber(
            region,
            results[(VesselType.ARTERY, region)],
            results[(VesselType.VEIN, region)],
            per_canonical,
            hubbard_ok=pixel_size_um is not None,
        )
        for region in ZONES
    ]
    return Measurements(
        vessels=VesselMeasurements(length_unit=unit, features=features, calibers=calibers),
        disc=_disc(geometry, unit, per_px),
        fovea=None if masks.fovea is None else Point(x=masks.fovea[0], y=masks.fovea[1]),
        pixel_size_um=pixel_size_um,
        canonical_scale=grid.scale,
    )


def _trace(
    grid: CanonicalGrid, mask: BoolArray | None, width_region: BoolArray | None
) -> TracedVessels | None:
    return None if mask is None else trace(grid.resample(mask), width_region=width_region)


def _zones(
    grid: CanonicalGrid, geometry: DiscGeometry | None
) -> tuple[dict[Region, BoolArray | None], BoolArray | None]:
    """Zone masks on the grid (None without a disc or for a zone missing the grid entirely),
    and where vessel widths are needed: the zones and a vessel radius round them."""
    zones: dict[Region, BoolArray | None] = dict.fromkeys(ZONES)
    if geometry is None:
        return zones, None
    distance = centre_distance((grid.size, grid.size), grid.to_canonical(*geometry.center))
    radius = geometry.diameter / 2.0 * grid.scale
    for region, radii in ZONES.items():
        zone = annulus(distance, radius, radii)
        zones[region] = zone if zone.any() else None
    margin = MAX_RADIUS / max(radius, 1.0)
    reach = (min(r[0] for r in ZONES.values()) - margin, max(r[1] for r in ZONES.values()) + margin)
    return zones, annulus(distance, radius, reach)


def _region(
    traced: TracedVessels | None, region: Region, zones: dict[Region, BoolArray | None]
) -> RegionFeatures | None:
    if traced is None:
        return None
    if region == Region.WHOLE:
        return measure_region(traced, None)
    zone = zones[region]
    return None if zone is None else measure_region(traced, zone)


def _vessel_features(
    vtype: VesselType, region: Region, result: RegionFeatures | None, per_canonical: float
) -> VesselFeatures:
    if result is None:
        return VesselFeatures(vessel_type=vtype, region=region)
    return VesselFeatures(
        vessel_type=vtype,
        region=region,
        fractal_dimension=result.fractal_dimension,
        vessel_density=result.vessel_density,
        average_width=_scaled(result.average_width, per_canonical),
        distance_tortuosity=result.distance_tortuosity,
        squared_curvature_tortuosity=_scaled(
            result.squared_curvature_tortuosity, 1 / per_canonical
        ),
        tortuosity_density=result.tortuosity_density,
        vessel_count=result.vessel_count,
        branching_angle_deg=result.branching_angle,
    )


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _caliber(
    region: Region,
    artery: RegionFeatures | None,
    vein: RegionFeatures | None,
    per_canonical: float,
    *,
    hubbard_ok: bool,
) -> CaliberSummary:
    """CRAE / CRVE from the six widest pieces; Hubbard's constants need micrometres."""

    def equivalent(result: RegionFeatures | None, kind: VesselKind, method: str) -> float | None:
        if result is None:
            return None
        widths: FloatArray = result.piece_widths * per_canonical
        if method == "hubbard":
            return hubbard(widths.tolist(), kind) if hubbard_ok else None
        return knudtson(widths.tolist(), kind)

    crae_h, crve_h = equivalent(artery, "artery", "hubbard"), equivalent(vein, "vein", "hubbard")
    crae_k, crve_k = equivalent(artery, "artery", "knudtson"), equivalent(vein, "vein", "knudtson")
    return CaliberSummary(
        region=region,
        crae_hubbard=crae_h,
        crve_hubbard=crve_h,
        avr_hubbard=_ratio(crae_h, crve_h),
        crae_knudtson=crae_k,
        crve_knudtson=crve_k,
        avr_knudtson=_ratio(crae_k, crve_k),
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _disc(geometry: DiscGeometry | None, unit: LengthUnit, per_px: float) -> Disc:
    if geometry is None:
        return Disc(length_unit=unit)
    return Disc(
        center=Point(x=geometry.center[0], y=geometry.center[1]),
        length_unit=unit,
        disc_height=geometry.height * per_px,
        disc_width=geometry.width * per_px,
        cup_height=_scaled(geometry.cup_height, per_px),
        cup_width=_scaled(geometry.cup_width, per_px),
        cdr_vertical=geometry.cdr_vertical,
        cdr_horizontal=geometry.cdr_horizontal,
        disc_diameter_px=geometry.diameter,
    )
