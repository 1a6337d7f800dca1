"""The quality model's training command: degradations, a short run, resume, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from services.analysis.engine.model_files import load_verified
from services.analysis.engine.quality import image_measures, to_square
from shared.synthetic import SyntheticFundusSpec, generate_fundus
from training.quality import train
from training.quality.degrade import DEGRADATIONS, GOOD, REJECT, USABLE, degrade


@pytest.fixture(scope="module")
def fundus() -> np.ndarray:
    return to_square(generate_fundus(SyntheticFundusSpec(size=512, disc_radius_px=34), seed=0).rgb)


@pytest.mark.parametrize("kind", sorted(DEGRADATIONS))
def test_every_degradation_keeps_shape_and_range(fundus: np.ndarray, kind: str) -> None:
    image = fundus.astype(np.float32) / 255
    out = DEGRADATIONS[kind](image, 1.0, np.random.default_rng(0))
    assert out.shape == image.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not np.allclose(out, image)


def test_severe_blur_lowers_the_sharpness_measure(fundus: np.ndarray) -> None:
    image = fundus.astype(np.float32) / 255
    blurred = DEGRADATIONS["blur"](image, 1.0, np.random.default_rng(0))
    sharp = image_measures(fundus)["sharpness"]
    assert image_measures((blurred * 255).astype(np.uint8))["sharpness"] < 0.5 * sharp


def test_good_images_are_only_jittered(fundus: np.ndarray) -> None:
    image = fundus.astype(np.float32) / 255
    rng = np.random.default_rng(1)
    good = degrade(image, GOOD, rng)
    assert abs(float(good.mean()) - float(image.mean())) < 0.1
    for grade in (USABLE, REJECT):
        assert degrade(image, grade, rng).shape == image.shape


def test_a_short_run_resumes_and_exports_verified_weights(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "DRIVE" / "training" / "images"
    folder.mkdir(parents=True)
    for seed in range(6):
        rgb = generate_fundus(SyntheticFundusSpec(size=384, disc_radius_px=25), seed=seed).rgb
        Image.fromarray(rgb).save(folder / f"{seed:02d}.png")
    common = [
        "--data-root",
        str(tmp_path / "data"),
        "--batch-size",
        "4",
        "--threads",
        "1",
        "--checkpoint",
        str(tmp_path / "ckpt.pt"),
        "--out",
        str(tmp_path / "q.safetensors"),
    ]
    runner = CliRunner()
    first = runner.invoke(train.app, ["--steps", "12", "--stop-after", "10", *common])
    assert first.exit_code == 0, first.output
    assert "stopped at step 10 of 12" in first.output
    assert not (tmp_path / "q.safetensors").exists()
    again = runner.invoke(train.app, ["--steps", "12", *common])
    assert again.exit_code == 0, again.output
    assert "resumed at step 10" in again.output
    files = load_verified(tmp_path / "q.safetensors")
    assert files.manifest["recipe"]["steps"] == 12
    assert set(files.manifest["normal_ranges"]) == set(
        image_measures(np.zeros((8, 8, 3), np.uint8))
    )
    json.dumps(files.manifest)
