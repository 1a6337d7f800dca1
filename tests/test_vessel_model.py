"""The committed vessel + A/V model: integrity, inference, and a tiny training run."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services.analysis.engine.model_files import ModelIntegrityError, sha256_of
from services.analysis.engine.nets import VesselUNet, fold_batch_norm
from services.analysis.engine.vessels import DEFAULT_WEIGHTS, VesselSegmenter
from shared.synthetic import SyntheticFundusSpec, generate_fundus
from training.segmentation import datasets
from training.segmentation.evaluate import binary_metrics
from training.segmentation.train_vessels import (
    Config,
    load_checkpoint,
    load_images,
    new_state,
    train,
)

DATASETS = datasets.DEFAULT_ROOT
needs_datasets = pytest.mark.skipif(
    not (DATASETS / "DRIVE").is_dir(), reason="../shared/datasets is absent"
)


@pytest.fixture(scope="module")
def segmenter() -> VesselSegmenter:
    return VesselSegmenter.load()


def dice(predicted: np.ndarray, reference: np.ndarray) -> float:
    return binary_metrics(predicted, reference)["dice"]


def test_manifest_checksum_matches_weights() -> None:
    manifest = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    assert manifest["sha256"] == sha256_of(DEFAULT_WEIGHTS)
    assert manifest["training"]["wall_time_s"] > 0
    assert DEFAULT_WEIGHTS.stat().st_size < 8 * 2**20


def test_folding_batch_norm_keeps_the_outputs_and_removes_the_norms() -> None:
    torch.manual_seed(0)
    net = VesselUNet(in_channels=6, widths=(4, 8, 16), classes=4)
    for norm in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        # Running statistics and affine terms far from the identity, as after training
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.2, 3)
        norm.weight.data.uniform_(0.5, 2)
        norm.bias.data.uniform_(-1, 1)
    batch = torch.randn(2, 6, 32, 48)
    with torch.inference_mode():
        expected = net.eval()(batch)
        folded = fold_batch_norm(net)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        torch.testing.assert_close(folded(batch), expected, rtol=1e-4, atol=1e-4)


def test_a_loaded_segmenter_runs_without_batch_norm(segmenter: VesselSegmenter) -> None:
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in segmenter.net.modules())


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    weights = tmp_path / DEFAULT_WEIGHTS.name
    shutil.copy(DEFAULT_WEIGHTS, weights)
    shutil.copy(DEFAULT_WEIGHTS.with_suffix(".json"), weights.with_suffix(".json"))
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="checksum mismatch"):
        VesselSegmenter.load(weights)


def test_synthetic_fundus_vessels_are_found(segmenter: VesselSegmenter) -> None:
    fundus = generate_fundus(SyntheticFundusSpec(size=640), seed=3)
    maps = segmenter.predict(fundus.rgb)
    assert maps.vessel.shape == fundus.rgb.shape[:2]
    assert maps.vessel.dtype == np.float32
    assert maps.vessel.min() >= 0.0 and maps.vessel.max() <= 1.0
    assert maps.labels.shape == fundus.rgb.shape[:2]
    assert set(np.unique(maps.labels)) <= {0, 1, 2}
    assert dice(maps.vessel >= maps.threshold, fundus.vessel_mask) > 0.5


@needs_datasets
def test_real_drive_test_image(segmenter: VesselSegmenter) -> None:
    sample = datasets.drive(DATASETS, "test")[0]
    rgb = datasets.read_rgb(sample)
    fov = datasets.read_fov(sample, rgb)
    maps = segmenter.predict(rgb)
    reference = datasets.read_vessel(sample.vessel)
    assert dice(maps.vessel[fov] >= maps.threshold, reference[fov]) > 0.75
    labels = datasets.read_av(sample)
    on_av = (labels == 1) | (labels == 2)
    assert np.mean((maps.artery[on_av] >= 0.5) == (labels[on_av] == 1)) > 0.8


def _smoke_samples(tmp_path: Path) -> list[datasets.Sample]:
    """Two DRIVE training images, or two synthetic fundi written as files when absent."""
    if (DATASETS / "DRIVE").is_dir():
        return datasets.drive(DATASETS, "training")[:2]
    samples = []
    for seed in (0, 1):
        fundus = generate_fundus(SyntheticFundusSpec(size=512, disc_radius_px=40), seed=seed)
        image, vessel = tmp_path / f"{seed}.png", tmp_path / f"{seed}_vessel.png"
        Image.fromarray(fundus.rgb).save(image)
        Image.fromarray(fundus.vessel_mask.astype(np.uint8) * 255).save(vessel)
        samples.append(datasets.Sample("synthetic", str(seed), image, vessel=vessel))
    return samples


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: a second thread only adds synchronisation (10x slower on a busy box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_training_smoke_run_learns_and_resumes(tmp_path: Path) -> None:
    config = Config(
        steps=40, batch=4, patch=64, lr=3e-3, warmup=2, seed=0, out_dir=tmp_path / "run",
        checkpoint_every=20, log_every=20, widths=(8, 16, 32), export=False,
    )  # fmt: skip
    images = load_images(_smoke_samples(tmp_path), seed=0)
    fresh = train(config, images, new_state(config))
    assert fresh.step == 40 and len(fresh.losses) == 40
    assert np.mean(fresh.losses[-10:]) < np.mean(fresh.losses[:10])

    longer = Config(**{**config.__dict__, "steps": 60})
    resumed = load_checkpoint(longer, config.out_dir / "checkpoint.pt")
    assert resumed.step == 40 and resumed.losses == fresh.losses
    resumed = train(longer, images, resumed)
    assert resumed.step == 60 and len(resumed.losses) == 60
    assert [run["from_step"] for run in resumed.runs] == [0, 40]
    # Restored weights: the resumed run starts where the first one ended, not from scratch.
    assert np.mean(resumed.losses[40:50]) < np.mean(fresh.losses[:10])
