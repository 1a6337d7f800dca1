"""What to draw: the pydantic description of a synthetic fundus.

Lengths are in pixels of the square canvas (defaults sized for AutoMorph's 912 px grid).
Laterality follows the usual photographic convention (the image as seen facing the patient):
a right eye (OD) has its disc on the right of the image and its macula on the left; a left eye
is the mirror image.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.findings import Laterality, LesionType


class LesionSpec(BaseModel):
    """One lesion placed by hand; its outline is still randomised (seeded) round the circle."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: LesionType
    center: tuple[float, float] = Field(description="(x, y) in pixels")
    radius: float = Field(ge=2, le=60, description="px; >= 2 so the mask is never empty")


class SyntheticFundusSpec(BaseModel):
    """The knobs of `generate_fundus`; every default gives a plausible 912 px right eye."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(default=912, ge=128, le=4096, description="square canvas side, px")
    fov_radius_fraction: float = Field(default=0.47, gt=0.2, le=0.5)
    laterality: Laterality = Laterality.RIGHT
    disc_center: tuple[float, float] | None = Field(
        default=None, description="(x, y) px; None: on the nasal side, see disc_nasal_offset"
    )
    disc_nasal_offset: float = Field(
        default=0.17, ge=0, le=0.35, description="disc x offset from the centre, x size"
    )
    disc_radius_px: float = Field(default=60.0, ge=10, le=200)
    cdr_vertical: float = Field(default=0.45, ge=0.05, le=0.95)
    cdr_horizontal: float | None = Field(
        default=None, ge=0.05, le=0.95, description="None: the vertical CDR"
    )
    fovea_offset_dd: tuple[float, float] = Field(
        default=(2.5, 0.3), description="(temporal, inferior) disc-to-fovea offset, disc diameters"
    )
    # Vessel tree.
    vessels_per_kind: int = Field(
        default=4, ge=0, le=6, description="trunks of each kind leaving the disc; 1-2 are arcades"
    )
    branching_depth: int = Field(default=4, ge=0, le=6, description="bifurcations per path")
    artery_root_width_px: float = Field(default=9.0, gt=0, le=40)
    vein_root_width_px: float = Field(default=12.0, gt=0, le=40)
    width_rule: Literal["murray", "ratio"] = Field(
        default="murray", description="murray: w^3 = w1^3 + w2^3; ratio: fixed width_ratio"
    )
    width_ratio: float = Field(
        default=0.8, gt=0, lt=1, description="ratio rule: continuing child width / parent width"
    )
    branch_asymmetry: float = Field(
        default=0.75, gt=0, le=1, description="side-branch width / continuing-branch width"
    )
    min_width_px: float = Field(default=2.0, gt=0, description="thinner children are not drawn")
    segment_length_dd: float = Field(
        default=1.1, gt=0, le=5, description="first segment length, in disc diameters"
    )
    segment_length_decay: float = Field(default=0.8, gt=0, le=1.5)
    tortuosity_amplitude_px: float = Field(default=2.0, ge=0, le=20)
    tortuosity_wavelength_px: float = Field(default=80.0, ge=10, le=1000)
    # Lesions: explicit ones, and a count per type placed at random (outside the disc).
    lesions: tuple[LesionSpec, ...] = ()
    lesion_counts: dict[LesionType, int] = Field(default_factory=dict)
    # Image formation.
    noise_std: float = Field(default=3.0, ge=0, le=50, description="Gaussian noise, 8-bit units")
    vignetting: float = Field(default=0.3, ge=0, lt=1, description="brightness loss at the rim")
    blur_sigma_px: float = Field(default=0.6, ge=0, le=5, description="optics; masks stay sharp")

    @model_validator(mode="after")
    def _check(self) -> SyntheticFundusSpec:
        if any(count < 0 for count in self.lesion_counts.values()):
            raise ValueError("lesion counts must be >= 0")
        if self.disc_radius_px >= self.fov_radius_fraction * self.size / 3:
            raise ValueError("the disc must be much smaller than the field of view")
        return self

    @property
    def cdr_horizontal_value(self) -> float:
        return self.cdr_vertical if self.cdr_horizontal is None else self.cdr_horizontal


# A moderate NPDR-like load for the demo.
DEMO_LESION_COUNTS = {
    LesionType.MICROANEURYSM: 8,
    LesionType.HAEMORRHAGE: 4,
    LesionType.HARD_EXUDATE: 6,
    LesionType.SOFT_EXUDATE: 2,
}
