"""Measurement engine: AutoMorph's vessel and optic-disc features, and ours, from any masks.

    from services.analysis.features import MaskSet, measure

    result = measure(
        MaskSet(vessel=v, artery=a, vein=w, disc=d, cup=c, fovea=(x, y)), pixel_size_um=6.0
    )
    result.vessels    # findings.VesselMeasurements: 9 VesselFeatures (all / artery / vein x
                      # whole / zone B / zone C) and 2 CaliberSummary (zones B and C)
    result.disc       # findings.Disc
    result.columns()  # flat {column: value} for a CSV, AutoMorph's names first

The masks may come from our segmenters or a user's; only `vessel` is required. Everything is
vectorised numpy / scipy / scikit-image: no per-pixel Python loop, no JIT warm-up (the first
call costs what the others do). About 0.1 s for the full set on a 912 px grid (bench/features.py).

Columns
-------
AutoMorph's, by its names (AUTOMORPH_COLUMNS, 72): Disc_height, Disc_width, Cup_height,
Cup_width, CDR_vertical, CDR_horizontal; then for the whole image, zone B and zone C, each of
Fractal_dimension, Vessel_density, Average_width, Distance_tortuosity,
Squared_curvature_tortuosity, Tortuosity_density for all vessels (no prefix), arteries
("Artery_") and veins ("Vein_"); in zones B and C also CRAE_Hubbard, CRVE_Hubbard,
AVR_Hubbard, CRAE_Knudtson, CRVE_Knudtson, AVR_Knudtson. Zone columns carry the suffixes
"_zone_b" / "_zone_c" that AutoMorph's csv_merge.py gives them when it joins its zone tables to
the whole-image one (Disc_Features.csv), e.g. Artery_Average_width_zone_b, AVR_Knudtson_zone_c.
Ours (EXTRA_COLUMNS): Vessel_count and Branching_angle with the same prefixes and suffixes,
Disc_center_x, Disc_center_y, Disc_diameter_px, Fovea_x, Fovea_y (pixels of the masks) and
Pixel_size_um (the calibration used; empty when lengths are in pixels).

Grid and units
--------------
Masks are padded to a centred square (nothing cropped: pass FOV-cropped masks, as AutoMorph's
M0 step makes) and resampled to `canonical_size` (912, AutoMorph's grid) with bilinear,
area-averaging-when-shrinking interpolation thresholded at one half, so box counting, density,
tortuosity and the segment filter see every camera at one scale. Disc and cup are measured on
the masks themselves (exact extents). Lengths (widths, CRAE/CRVE, disc and cup extents) are
reported in micrometres when `pixel_size_um` (per pixel of the masks) is given, otherwise in
pixels of the masks, never of the grid; `VesselMeasurements.length_unit` / `Disc.length_unit`
say which, and `Measurements.canonical_scale` converts to grid pixels. Squared curvature is per
that length unit. Density, fractal dimension, distance tortuosity, tortuosity density (its 1/L
in grid pixels, as AutoMorph's), AVR and CDR have no unit.

None
----
Never 0 or NaN in place of a measurement: a mask not given (None) gives None for its
features; without a disc, zone features, CRAE/CRVE/AVR and disc fields are None; a zone that
misses the grid entirely is None (one partly outside is measured on its visible part); CRAE /
CRVE need six measurable vessels in the zone; Hubbard's formulas need micrometres (their
constants, -10.76 and 450.05, are in micrometres squared), so they are None when uncalibrated,
while Knudtson's (scale-free) is given in pixels. An empty mask has a density of 0 and a vessel
count of 0 (measured) but no fractal dimension, width or tortuosity.

Method, per vessel type
-----------------------
Skeleton (Zhang thinning) broken at branch points into segments, spurs shorter than two local
radii pruned, each segment's pixels ordered along the vessel and smoothed by a 7-point moving
average (skeleton.py). The zones' measures use the whole image's centreline restricted to the
zone, in runs ("pieces"), and the mask restricted to the zone, as AutoMorph does. Segments or
pieces of more than 15 points are measured (AutoMorph's filter) and the tortuosities averaged
over them; all of them count for the width.

- Fractal_dimension: box counting, see fractal.py.
- Vessel_density: vessel pixels / all grid pixels (AutoMorph's denominator, zones included).
- Average_width: vessel area / centreline length, each free end's centreline extended to the
  vessel's tip by the local radius.
- Distance_tortuosity: arc / chord per piece (chord >= 2 px: not on closed loops). The last
  1.5 vessel radii at a free end, where thinning bends the centreline into a corner of a
  blunt end, are replaced by the straight continuation of the rest (vessels.TIP_TRIM).
- Squared_curvature_tortuosity: integral of curvature squared along each piece (1 / length),
  tips left out; curvature from the turning between 8-point chords.
- Tortuosity_density (Grisan 2003): (n - 1) / n + (1 / L) sum over the n turns (runs of one
  curvature sign) of (arc / chord - 1).
- CRAE / CRVE: the six widest artery / vein pieces of the zone, each piece's width being its
  area (pixels nearest its centreline) over its centreline length away from its ends; paired
  iteratively by Knudtson's or Hubbard's formula (caliber.py); AVR = CRAE / CRVE.
- Vessel_count: the measured segments (pieces in a zone), AutoMorph's internal count.
- Branching_angle: mean over bifurcations (branch points of exactly three branches) of the
  angle between the two daughters, taken as the smallest of the three angles between the
  branches' directions (the parent runs opposite to both; no disc or width needed); each
  direction is the chord from two local radii out of the branch point (where the junction
  no longer bends the centreline) to 20 px further; branch points with a shorter branch are
  left out. In a zone: the bifurcations whose branch point lies in it.
- Disc: extents (rows / columns spanned) of the largest connected part of the disc and cup
  masks; CDRs are cup over disc extent; zones centre on the disc centroid with r = half the
  larger disc extent: zone B = 2r..3r, zone C = 2r..5r.

DIFFERENCES from AutoMorph, deliberate
--------------------------------------
1. Ordered centrelines: AutoMorph traces each segment in its flood-fill search order, which
   jumps back and forth along the vessel; we order pixels along it and smooth the staircase.
   Arc lengths, curvature and inflections follow the vessel, not the scan.
2. Squared_curvature_tortuosity: AutoMorph integrates the signed curvature over the point
   index and takes the absolute value (|net turning|, radians, not squared). Ours is squared
   and integrated over arc length (Hart 1999), so an S-bend no longer cancels to 0.
3. Tortuosity_density: AutoMorph counts inflections as sign changes of the y differences,
   divides by the inflection count and leaves out the last turn; ours counts turns of the
   curvature sign along the vessel, as Grisan defines n.
4. Average_width: AutoMorph divides the area by the number of skeleton pixels, which
   overstates diagonal vessels' widths by up to 41 %; ours divides by the centreline length
   (plus the tips' radii). Piece widths for CRAE/CRVE: AutoMorph grows circles to the
   vessel edge (whole-pixel diameters); ours is area / length, sub-pixel.
5. Fractal_dimension: AutoMorph counts only partly filled boxes (0 < count < k^2, which gives a
   filled square D = 1) over boxes of 512..4 px; ours counts occupied boxes over 128..4 px
   (at 912) with edge boxes weighted by their area inside the image.
6. Disc and cup: extents as rows/columns spanned (max - min + 1) on the masks' own pixels;
   AutoMorph takes max - min on its 912 grid and keeps the two largest blobs. The zone
   radius is half the larger extent as a float (AutoMorph truncates to an integer).
7. Hubbard only in micrometres, CRAE/CRVE only with six vessels, absent values None
   (AutoMorph: -1, or formulas applied to grid pixels).
8. Branch points stay on the paths they end (AutoMorph erases a 3x3 neighbourhood round each),
   spurs are pruned, and arc / chord straightens the bend thinning puts at blunt vessel ends.
9. Canonical grid: pad-to-square and area-aware resampling of the masks; AutoMorph resizes
   its crops with cubic interpolation. Everything else (zones, big-six pairing order, density
   denominator, the 15-point segment filter, the 912 grid) agrees with AutoMorph.
"""

from services.analysis.features.grid import CanonicalGrid, MaskSet
from services.analysis.features.measure import (
    AUTOMORPH_COLUMNS,
    EXTRA_COLUMNS,
    Measurements,
    measure,
)

__all__ = [
    "AUTOMORPH_COLUMNS",
    "EXTRA_COLUMNS",
    "CanonicalGrid",
    "MaskSet",
    "Measurements",
    "measure",
]
