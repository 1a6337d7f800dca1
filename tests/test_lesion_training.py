"""The lesion training pipeline: colour-mask decoding, IDRiD-seg-512's masks, tile sampling,
the loss, and one optimiser step (the loop the real runs use). Only the 512-px masks' check
against the full-size ones needs the datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench import lesion_masks_512
from services.analysis.engine import runtime
from services.lesion.engine.detector import SHORT_NAMES, TYPES
from services.lesion.engine.preprocess import INPUT_CHANNELS, standardise
from tests.conftest import DATASETS
from training.lesions import data, train
from training.segmentation import train_vessels


def test_idrid_colour_masks_decode_to_the_four_types_and_drop_the_disc() -> None:
    colours = np.array(
        [[[255, 255, 255], [255, 0, 0], [0, 0, 255], [0, 255, 0], [255, 255, 0], [255, 0, 255]]],
        dtype=np.uint8,
    )  # MA, HE, EX, SE, optic disc, HE overlapping EX
    ma, he, ex, se = data.decode_colour_mask(colours)
    assert ma[0].tolist() == [True, False, False, False, False, False]
    assert he[0].tolist() == [False, True, False, False, False, True]
    assert ex[0].tolist() == [False, False, True, False, False, True]
    assert se[0].tolist() == [False, False, False, True, False, False]


def test_folds_hold_out_every_full_size_image_exactly_once() -> None:
    held_out = [image for fold in range(data.FOLDS) for image in data.fold_ids(fold)]
    assert sorted(held_out) == sorted(data.FULL_IDS)


def test_lowres_masks_keep_dark_haemorrhages_and_the_photograph_s_shape(tmp_path: Path) -> None:
    folder = tmp_path / "IDRiD-seg-512" / "images" / "jpg"
    folder.mkdir(parents=True)
    photo = np.zeros((512, 512, 3), dtype=np.uint8)
    photo[43:469] = (200, 100, 40)  # letterboxed: black bars above and below
    Image.fromarray(photo).save(folder / "IDRiD_30.jpg", quality=90)
    yy, xx = np.mgrid[:512, :512]
    disc = (yy - 256) ** 2 + (xx - 300) ** 2 <= 40**2
    haemorrhage = np.zeros_like(photo)
    haemorrhage[disc] = (120, 30, 20)  # grey level 56: the photograph's pixels, dark red
    Image.fromarray(haemorrhage).save(folder / "IDRiD_30_HE.jpg", quality=90)
    rgb, masks = data.load_lowres("IDRiD_30", tmp_path)
    side = data.LOWRES_SIDE
    assert rgb.shape == (side, side, 3) and masks.shape == (4, side, side)
    scale = side / 512
    assert masks[1][round(256 * scale), round(300 * scale)]
    assert masks[1].sum() == pytest.approx(disc.sum() * scale**2, rel=0.1)
    assert not masks[1][: round(200 * scale)].any()
    assert not masks[[0, 2, 3]].any()  # no file: no lesion of that type


@pytest.mark.skipif(
    not (DATASETS / "IDRiD-seg-512").is_dir(), reason="../shared/datasets is absent"
)
def test_lowres_haemorrhage_masks_match_the_full_size_ones() -> None:
    dice = lesion_masks_512.measure(DATASETS, ("IDRiD_17", "IDRiD_03"))["he"]
    assert dice["brightest"][str(data.LOWRES_MASK_LEVEL)] > 0.85
    assert dice["grey"]["127"] < 0.2  # the rule the loader used before


def _grid_image(rng: np.random.Generator, ma_valid: bool = True) -> data.GridImage:
    size = 320
    yy, xx = np.mgrid[:size, :size]
    fov = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 2 - 4) ** 2
    masks = np.zeros((4, size, size), dtype=bool)
    for channel, radius in enumerate((2, 6, 4, 9)):
        cy, cx = rng.integers(80, 240, size=2)
        masks[channel] = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    rgb = np.full((size, size, 3), 120, dtype=np.uint8)
    rgb[masks[1]] = (60, 20, 10)  # haemorrhage: dark red
    rgb[masks[2]] = (230, 220, 90)  # exudate: bright yellow
    inputs = standardise(rgb, fov, size / 2 - 4).astype(np.float16)
    targets = (masks * 255).astype(np.uint8) * fov
    return data.GridImage("synthetic", inputs, targets, fov, ma_valid)


def test_one_training_step_learns_from_lesion_centred_tiles() -> None:
    rng = np.random.default_rng(0)
    config = train.Config(batch=4, tile=64, widths=(4, 8, 16, 32, 64), lesion_fraction=1.0)
    pools = {
        "full": [(image, train.seeds_of(image, rng)) for image in (_grid_image(rng),)],
        "lowres": [(image, train.seeds_of(image, rng)) for image in (_grid_image(rng, False),)],
        "negative": [],
    }
    inputs, targets, weights = train.sample_batch(pools, config, rng)
    assert inputs.shape == (4, INPUT_CHANNELS, 64, 64) and targets.shape == (4, 4, 64, 64)
    assert targets.sum() > 0  # lesion-centred tiles contain lesions
    assert set(weights[:, 0].tolist()) <= {0.0, 1.0}  # MA counts only where it is labelled
    state = train.new_state(config)
    before = [p.detach().clone() for p in state.net.parameters()]
    every_type = torch.ones(4, dtype=torch.bool)
    loss = train.compute_loss(state.net(inputs), targets, weights, every_type)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    state.optimizer.step()
    changed = sum(
        not torch.equal(a, b) for a, b in zip(before, state.net.parameters(), strict=True)
    )
    assert changed == len(before)


@pytest.mark.parametrize("dice_when_absent", [(), ("ma", "he", "ex"), ("se",)])
def test_dice_counts_for_absent_types_only_where_asked(dice_when_absent: tuple[str, ...]) -> None:
    """HE and SE absent from the batch: each gets Dice's push towards 0 only when named,
    otherwise its gradient is BCE's alone, sigmoid / (types x tiles x pixels). Present types
    always have their Dice term."""
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    targets = torch.zeros(2, 4, 8, 8)
    targets[:, [0, 2], 2:4, 2:4] = 1.0  # MA and EX present, HE and SE absent
    named = torch.tensor([SHORT_NAMES[t] in dice_when_absent for t in TYPES])
    train.compute_loss(logits, targets, torch.ones(2, 4), named).backward()
    assert logits.grad is not None
    for channel in range(4):
        bce_only = (torch.sigmoid(logits[:, channel]).detach() - targets[:, channel]) / (4 * 128)
        has_dice = channel in (0, 2) or bool(named[channel])
        assert torch.allclose(logits.grad[:, channel], bce_only) is not has_dice, channel


def test_dice_when_absent_takes_known_types_only() -> None:
    assert train.parse_args(["--dice-when-absent", ""]).dice_when_absent == ()
    assert train.parse_args(["--dice-when-absent", "se,ma"]).dice_when_absent == ("se", "ma")
    with pytest.raises(SystemExit):
        train.parse_args(["--dice-when-absent", "drusen"])


def test_negative_tiles_teach_every_type_absent() -> None:
    rng = np.random.default_rng(1)
    config = train.Config(batch=6, tile=64, negative_fraction=1.0, lowres_fraction=0.0)
    healthy = _grid_image(rng)
    healthy = data.GridImage("other-camera", healthy.inputs, healthy.targets * 0, healthy.fov, True)
    pools = {
        "full": [(image, train.seeds_of(image, rng)) for image in (_grid_image(rng),)],
        "lowres": [],
        "negative": [(healthy, train.seeds_of(healthy, rng))],
    }
    _, targets, weights = train.sample_batch(pools, config, rng)
    assert targets.sum() == 0
    assert weights.min() == 1.0  # MA included: a lesion-free photograph has none


def test_fine_tuning_carries_the_earlier_runs_and_refuses_another_folds_model(
    tmp_path: Path,
) -> None:
    weights = tmp_path / "lesion-unet.safetensors"
    config = train.Config(
        widths=(4, 8, 16, 32, 64), fold="all", output=weights, negative_fraction=0.0
    )
    state = train.new_state(config)
    state.step, state.elapsed_s = 7, 12.0
    train.export(config, state)

    tuned = train.Config(**{**config.__dict__, "init": weights})
    resumed = train.new_state(tuned)
    train.start_from(tuned, resumed)
    assert [run["steps"] for run in resumed.earlier_runs] == [7]
    resumed.step, resumed.elapsed_s = 3, 5.0
    manifest = train.export(tuned, resumed)
    assert manifest["training"]["steps"] == 10 and manifest["training"]["wall_time_s"] == 17.0
    assert len(manifest["training"]["runs"]) == 2

    with pytest.raises(SystemExit, match="fold all"):
        train.start_from(train.Config(**{**tuned.__dict__, "fold": "0"}), train.new_state(tuned))
    with pytest.raises(SystemExit, match=r"grid scale 1\.0"):
        coarse = train.Config(**{**tuned.__dict__, "grid_scale": 0.25})
        train.start_from(coarse, train.new_state(coarse))


def test_a_context_model_trains_on_a_grid_a_quarter_as_fine(tmp_path: Path) -> None:
    """The grid keeps the crop, the masks stay area fractions, and the manifest records the
    scale for the detector."""
    rgb = np.zeros((400, 600, 3), np.uint8)
    yy, xx = np.mgrid[:400, :600]
    rgb[(yy - 200) ** 2 + (xx - 300) ** 2 < 190**2] = (150, 80, 40)
    masks = np.zeros((4, 400, 600), bool)
    masks[1, 180:220, 280:320] = True  # a 40-px haemorrhage
    fine = data.on_grid(rgb, masks, "x", ma_valid=True)
    coarse = data.on_grid(rgb, masks, "x", ma_valid=True, grid_scale=0.25)
    assert coarse.inputs.shape[1:] == pytest.approx(np.array(fine.inputs.shape[1:]) / 4, abs=1)
    assert fine.targets[1].sum() / 255 == pytest.approx(1600 * 2.0**2, rel=0.05)  # MAX_UPSCALE
    assert coarse.targets[1].sum() / 255 == pytest.approx(1600 * 0.5**2, rel=0.05)
    config = train.Config(widths=(4, 8), grid_scale=0.25, output=tmp_path / "c.safetensors")
    manifest = train.export(config, train.new_state(config))
    assert manifest["architecture"]["grid_scale"] == 0.25


@pytest.mark.parametrize("zoom", [0.5, 1.0, 1.5])
def test_zoomed_tiles_show_a_lesion_at_zoom_times_its_size(zoom: float) -> None:
    size, radius = 256, 10
    yy, xx = np.mgrid[:size, :size]
    fov = np.ones((size, size), dtype=bool)
    lesion = (yy - 128) ** 2 + (xx - 128) ** 2 <= radius**2
    targets = np.zeros((4, size, size), dtype=np.uint8)
    targets[1] = lesion * 255
    inputs = np.repeat(np.where(lesion, -2.0, 0.0)[None], INPUT_CHANNELS, 0).astype(np.float16)
    image = data.GridImage("one haemorrhage", inputs, targets, fov, True)
    rng = np.random.default_rng(2)
    config = train.Config(tile=96, lesion_fraction=1.0, zoom=(zoom, zoom))
    tile_inputs, tile_targets = train.sample_tile(image, train.seeds_of(image, rng), config, rng)
    assert tile_inputs.shape == (INPUT_CHANNELS, 96, 96) and tile_targets.shape == (4, 96, 96)
    assert tile_targets.min() >= 0.0 and tile_targets.max() <= 1.0
    # The lesion's area (a target is an area fraction) scales with zoom squared.
    assert tile_targets[1].sum() == pytest.approx(lesion.sum() * zoom**2, rel=0.05)
    assert tile_targets[[0, 2, 3]].sum() == 0
    # Its contrast survives the resampling, wherever the tile put it.
    assert tile_inputs[0][tile_targets[1] > 0.99].mean() == pytest.approx(-2.0, abs=0.5)


def test_zoom_range_is_checked() -> None:
    assert train.parse_args([]).zoom == (1.0, 1.0)
    assert train.parse_args(["--zoom", "0.5,1.5"]).zoom == (0.5, 1.5)
    for wrong in ("1.5,0.5", "0.1,1", "1"):
        with pytest.raises(SystemExit):
            train.parse_args(["--zoom", wrong])


@pytest.mark.parametrize("trainer", [train, train_vessels], ids=["lesions", "vessels"])
@pytest.mark.parametrize("native", [True, False])
def test_bf16_autocast_defaults_to_where_it_is_native(
    trainer, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Emulated bf16 (an AVX2-only CPU) made a lesion training step 8 times slower than fp32.
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: native)
    assert trainer.parse_args(["--device", "cpu"]).bf16 is native
    assert trainer.parse_args(["--device", "cpu", "--bf16"]).bf16 is True
    assert trainer.parse_args(["--device", "cpu", "--no-bf16"]).bf16 is False
