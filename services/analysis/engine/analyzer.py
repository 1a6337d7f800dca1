"""The analysis pipeline on one FOV-cropped image: quality -> vessels and A/V -> disc and cup
-> fovea -> features, into the findings document.

Coordinates in the findings are pixels of the original upload (the crop offset is added back);
the masks kept for overlays and `--save-masks` are on the analysed (cropped) grid.
A stage whose model is not installed is reported "unavailable"; after a "reject" quality
grade nothing is measured ("skipped"), so no number is invented from an ungradable image.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from services.analysis.engine.disc import DiscSegmenter
from services.analysis.engine.fovea import locate_fovea
from services.analysis.engine.model_files import model_version
from services.analysis.engine.overlays import OverlayInputs
from services.analysis.engine.quality import QualityGrader
from services.analysis.engine.runtime import Precision
from services.analysis.engine.vessels import VesselSegmenter
from services.analysis.features import MaskSet, measure
from shared import findings

# Typical optic disc diameter (µm), for a pixel-size estimate when nothing calibrates the image.
TYPICAL_DISC_DIAMETER_UM = 1800.0

T = TypeVar("T")
logger = logging.getLogger(__name__)


@dataclass
class AnalysisResult:
    findings: findings.Findings
    layers: dict[str, np.ndarray] = field(default_factory=dict)
    overlay: OverlayInputs | None = None


def _timed(timings: dict[str, float], stage: str, run: Callable[[], T]) -> T:
    started = time.perf_counter()
    result = run()
    timings[stage] = round((time.perf_counter() - started) * 1000, 1)
    return result


def _stage(name: str, state: findings.StageState, detail: str = "") -> findings.StageStatus:
    return findings.StageStatus(stage=name, state=state, detail=detail)


def _shift(point: tuple[float, float], info: findings.ImageInfo) -> findings.Point:
    fov = info.field_of_view
    dx, dy = (fov.crop_x0, fov.crop_y0) if fov else (0, 0)
    return findings.Point(x=round(point[0] + dx, 1), y=round(point[1] + dy, 1))


def _load_optional(path: Path, loader: Callable[[Path], T]) -> T | None:
    """A model whose files are absent is not installed (its stage reports "unavailable");
    one whose files fail verification raises, so the service refuses to start."""
    if not path.exists():
        logger.warning("model not installed", extra={"weights": path.name})
        return None
    return loader(path)


@dataclass
class Analyzer:
    quality: QualityGrader | None
    vessels: VesselSegmenter | None
    disc: DiscSegmenter | None

    @classmethod
    def load(
        cls,
        weights_dir: Path,
        *,
        vessel_mirror_average: bool = True,
        vessel_precision: Precision = "auto",
    ) -> Analyzer:
        return cls(
            quality=_load_optional(weights_dir / "quality.safetensors", QualityGrader.load),
            vessels=_load_optional(
                weights_dir / "vessel-av-unet.safetensors",
                lambda path: VesselSegmenter.load(
                    path, precision=vessel_precision, mirror_average=vessel_mirror_average
                ),
            ),
            disc=_load_optional(
                weights_dir / "disc_cup.safetensors",
                lambda path: DiscSegmenter(weights_dir / "disc_locator.safetensors", path),
            ),
        )

    @property
    def manifests(self) -> list[dict]:
        """The manifests of the installed models."""
        manifests = []
        if self.quality is not None:
            manifests.append(self.quality.files.manifest)
        if self.vessels is not None:
            manifests.append(self.vessels.manifest)
        if self.disc is not None:
            manifests += [self.disc.locator_files.manifest, self.disc.segmenter_files.manifest]
        return manifests

    @property
    def models(self) -> list[findings.ModelVersion]:
        return [model_version(m) for m in self.manifests]

    def analyze(self, rgb: np.ndarray, info: findings.ImageInfo) -> AnalysisResult:
        result = findings.Findings(image=info, models=self.models)
        timings, stages = result.timings_ms, result.stages
        if self.quality is not None:
            result.quality = _timed(timings, "quality", lambda: self.quality.grade(rgb))
            stages.append(_stage("quality", findings.StageState.OK))
        else:
            stages.append(_stage("quality", findings.StageState.UNAVAILABLE, "no quality model"))
        if result.quality and result.quality.grade == findings.QualityGrade.REJECT:
            for name in ("vessels", "disc", "fovea", "features"):
                stages.append(_stage(name, findings.StageState.SKIPPED, "image graded reject"))
            return AnalysisResult(findings=result, overlay=OverlayInputs(rgb=rgb))
        return self._measure(rgb, info, result)

    def _measure(
        self, rgb: np.ndarray, info: findings.ImageInfo, result: findings.Findings
    ) -> AnalysisResult:
        timings, stages, layers = result.timings_ms, result.stages, {}
        labels = None
        if self.vessels is not None:
            maps = _timed(timings, "vessels", lambda: self.vessels.predict(rgb))
            labels = maps.labels
            layers |= {
                "vessel_prob": maps.vessel,
                "vessel": labels > 0,
                "artery": labels == 1,
                "vein": labels == 2,
            }
            stages.append(_stage("vessels", findings.StageState.OK))
        else:
            stages.append(_stage("vessels", findings.StageState.UNAVAILABLE, "no vessel model"))

        if self.disc is None:
            stages.append(_stage("disc", findings.StageState.UNAVAILABLE, "no disc model"))
        else:
            disc = _timed(timings, "disc", lambda: self.disc.analyse(rgb))
            if disc.found:
                layers |= {"disc": disc.disc, "cup": disc.cup}
                stages.append(_stage("disc", findings.StageState.OK))
            else:
                stages.append(_stage("disc", findings.StageState.FAILED, disc.reason))

        if "vessel" not in layers:
            return AnalysisResult(findings=result, layers=layers, overlay=OverlayInputs(rgb=rgb))
        masks = MaskSet(
            vessel=layers["vessel"],
            artery=layers.get("artery"),
            vein=layers.get("vein"),
            disc=layers.get("disc"),
            cup=layers.get("cup"),
        )
        pixel_size = info.calibration.pixel_size_um if info.calibration else None
        measured = _timed(timings, "features", lambda: measure(masks, pixel_size_um=pixel_size))
        stages.append(_stage("features", findings.StageState.OK))
        result.vessels = measured.vessels
        result.disc = measured.disc
        fovea_xy, zone = self._fovea_and_zone(rgb, layers, measured.disc, result)
        if result.disc is not None and result.disc.center is not None:
            disc_xy = (result.disc.center.x, result.disc.center.y)
            result.disc.center = _shift(disc_xy, info)
        if pixel_size is None and result.disc and result.disc.disc_diameter_px:
            result.image = info.model_copy(
                update={
                    "calibration": findings.Calibration(
                        source=findings.CalibrationSource.DISC_DIAMETER,
                        pixel_size_um=round(
                            TYPICAL_DISC_DIAMETER_UM / result.disc.disc_diameter_px, 3
                        ),
                    )
                }
            )
        overlay = OverlayInputs(
            rgb=rgb,
            vessel_labels=labels,
            disc=layers.get("disc"),
            cup=layers.get("cup"),
            zone_center=zone[0] if zone else None,
            zone_radius=zone[1] if zone else None,
            fovea=fovea_xy,
        )
        return AnalysisResult(findings=result, layers=layers, overlay=overlay)

    def _fovea_and_zone(
        self,
        rgb: np.ndarray,
        layers: dict[str, np.ndarray],
        disc: findings.Disc | None,
        result: findings.Findings,
    ) -> tuple[tuple[float, float] | None, tuple[tuple[float, float], float] | None]:
        """The fovea (cropped-image pixels) and the zone centre/radius, when a disc is known."""
        if disc is None or disc.center is None or not disc.disc_diameter_px:
            result.stages.append(
                _stage("fovea", findings.StageState.SKIPPED, "needs the optic disc")
            )
            return None, None
        center = (disc.center.x, disc.center.y)
        diameter = disc.disc_diameter_px
        estimate = _timed(
            result.timings_ms,
            "fovea",
            lambda: locate_fovea(rgb, center, diameter, layers.get("vessel")),
        )
        zone = (center, diameter / 2)
        if estimate is None:
            result.stages.append(
                _stage("fovea", findings.StageState.FAILED, "expected position is off the image")
            )
            return None, zone
        assert result.image is not None
        model = estimate.to_model()
        model.center = _shift((estimate.x, estimate.y), result.image)
        result.fovea = model
        result.stages.append(_stage("fovea", findings.StageState.OK))
        return (estimate.x, estimate.y), zone
