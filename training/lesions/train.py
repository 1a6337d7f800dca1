"""Train the lesion U-Net (MA, HE, EX, SE) on IDRiD and export it with a manifest.

    python -m training.lesions.train --fold 0 --steps 1500 \
        --output var/lesions/fold0/lesion-unet.safetensors
    python -m training.lesions.train --fold all --steps 1500   # the served model
    python -m training.lesions.train --fold all --grid-scale 0.25 --steps 2000 \
        --output services/lesion/weights/lesion-context-unet.safetensors   # its context model

Tiles of the working grid (about half of IDRiD's full resolution, where microaneurysms survive)
are drawn with a bias towards lesions: with probability --lesion-fraction a tile is centred on a
random labelled pixel of a type chosen uniformly among those the image has (MA and SE are rare
and would otherwise hardly be seen). --lowres-fraction of the tiles come from IDRiD-seg-512
(images 21-54, no MA labels), and --negative-fraction from photographs of other cameras trained
as lesion-free (data.negative_ids). --zoom MIN,MAX resizes each tile by a random factor in that
range (log-uniform), so the network also sees lesions at the sizes the detector's coarser and
finer test-time scales show them. --grid-scale 0.25 trains a context model instead: the same network
on a grid a quarter as fine, where a tile holds most of the fundus (detector.py mixes its maps
in). Loss per type: BCE + soft Dice over the batch (Dice keeps the
rare, tiny MA from being drowned by background; --dice-when-absent, compute_loss).
AdamW with warm-up and cosine decay; the decay follows the larger of step/--steps and
elapsed/--time-limit-min, so a run cut by its time limit still ends at a low learning rate.
--fold k holds out data.fold_ids(k) (cross-validation by image; the bench evaluates them);
--fold all trains on all 20 full-size images. --init WEIGHTS fine-tunes an exported model of
the same fold; the manifest lists every run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from services.analysis.engine.model_files import load_verified, save_with_manifest
from services.analysis.engine.nets import VesselUNet
from services.analysis.engine.runtime import bf16_is_native, pick_device
from services.lesion.engine.detector import DEFAULT_WEIGHTS, NAMES, SHORT_NAMES, TASK, TYPES
from services.lesion.engine.preprocess import INPUT_CHANNELS, WORK_FOV_DIAMETER
from training.lesions import data
from training.recording import shown

VERSION = "1.0.0"
MA = 0  # channel of microaneurysms
_POSITIVE = 128  # target level (area fraction x 255) counted as a lesion pixel for sampling
_MAX_SEEDS = 20_000  # sampled lesion pixels kept per image and type


@dataclass
class Config:
    steps: int = 1500
    batch: int = 8
    tile: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 50
    widths: tuple[int, ...] = (12, 24, 48, 96, 192)
    lesion_fraction: float = 0.6
    # Log-uniform zoom range of the tiles: at zoom z a tile shows tile / z working px resized to
    # `tile`, as the detector's test_time_scales show the photograph coarser or finer.
    zoom: tuple[float, float] = (1.0, 1.0)
    # Trains on a grid this many times as fine as the working grid: a context model (0.25) sees
    # a haemorrhage sheet whole in one tile (detector.CONTEXT_WEIGHTS).
    grid_scale: float = 1.0
    lowres_fraction: float = 0.2
    negative_fraction: float = 0.15
    # Types whose Dice term also counts in batches without them (compute_loss says why)
    dice_when_absent: tuple[str, ...] = ("ma", "he", "ex")
    seed: int = 0
    bf16: bool | None = None  # None: where native (runtime.bf16_is_native)
    threads: int = 0  # 0: torch's default (one per core)
    time_limit_min: float = 0.0  # 0: no limit
    fold: str = "all"  # "0".."3" or "all"
    data_root: Path = data.DEFAULT_ROOT
    cache: Path = Path("var/lesions/cache")
    output: Path = DEFAULT_WEIGHTS
    checkpoints: Path = Path("var/lesions/checkpoints")  # outside the repository's tracked files
    checkpoint_every: int = 100
    log_every: int = 25
    resume: bool = False
    device: str = "auto"  # "auto": CUDA when present, else the CPU
    init: Path | None = None  # exported weights to fine-tune

    def __post_init__(self) -> None:
        if self.bf16 is None:
            self.bf16 = bf16_is_native(pick_device(self.device))


@dataclass
class TrainState:
    net: VesselUNet
    optimizer: torch.optim.Optimizer
    step: int = 0
    elapsed_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    earlier_runs: list[dict] = field(default_factory=list)  # of the model --init started from


@dataclass(frozen=True)
class Seeds:
    """Where tiles of one image may be centred: lesion pixels per type, and FOV pixels."""

    lesion: list[np.ndarray]  # per channel, K x 2 (y, x); empty when unlabelled or absent
    fov: np.ndarray


def parse_args(argv: list[str] | None = None) -> Config:
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--tile", type=int, default=defaults.tile, help="tile side, px")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--widths", default=",".join(map(str, defaults.widths)))
    parser.add_argument("--lesion-fraction", type=float, default=defaults.lesion_fraction)
    parser.add_argument(
        "--zoom",
        type=zoom_range,
        default=",".join(map(str, defaults.zoom)),
        help="MIN,MAX tile zoom, drawn log-uniformly (0.5,1.5: lesions half to 1.5 times their "
        "working-grid size, with correspondingly more or less context)",
    )
    parser.add_argument(
        "--grid-scale",
        type=float,
        default=defaults.grid_scale,
        help="train on the working grid refined by this factor (0.25: the context model)",
    )
    parser.add_argument("--lowres-fraction", type=float, default=defaults.lowres_fraction)
    parser.add_argument("--negative-fraction", type=float, default=defaults.negative_fraction)
    parser.add_argument(
        "--dice-when-absent",
        default=",".join(defaults.dice_when_absent),
        help="types (ma,he,ex,se) whose Dice term counts in batches without them; '' for none",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        help="bf16 autocast (default: where native, runtime.bf16_is_native)",
    )
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--time-limit-min", type=float, default=defaults.time_limit_min)
    parser.add_argument("--fold", default=defaults.fold, choices=["all", "0", "1", "2", "3"])
    parser.add_argument("--data-root", type=Path, default=defaults.data_root)
    parser.add_argument("--cache", type=Path, default=defaults.cache)
    parser.add_argument("--output", type=Path, default=defaults.output, help="weights file")
    parser.add_argument("--checkpoints", type=Path, default=defaults.checkpoints)
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    parser.add_argument("--log-every", type=int, default=defaults.log_every)
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    parser.add_argument("--device", default=defaults.device, choices=["auto", "cpu", "cuda"])
    parser.add_argument("--init", type=Path, help="exported .safetensors of this fold to fine-tune")
    args = parser.parse_args(argv)
    absent = tuple(name for name in args.dice_when_absent.split(",") if name)
    if unknown := set(absent) - set(NAMES):
        parser.error(f"--dice-when-absent: unknown types {sorted(unknown)}")
    widths = tuple(int(w) for w in args.widths.split(","))
    return Config(**{**vars(args), "widths": widths, "dice_when_absent": absent})


def zoom_range(text: str) -> tuple[float, float]:
    low, high = (float(f) for f in text.split(","))
    if not 0.25 <= low <= high <= 4:
        raise argparse.ArgumentTypeError(f"zoom range {text!r}: need 0.25 <= MIN <= MAX <= 4")
    return low, high


def training_ids(config: Config) -> dict[str, list[str]]:
    """The ids used for training in this fold, per data.LOADERS kind."""
    held_out = set() if config.fold == "all" else set(data.fold_ids(int(config.fold)))
    return {
        "full": [i for i in data.FULL_IDS if i not in held_out],
        "lowres": list(data.LOWRES_IDS) if config.lowres_fraction > 0 else [],
        "negative": data.negative_ids(config.data_root) if config.negative_fraction > 0 else [],
    }


def seeds_of(image: data.GridImage, rng: np.random.Generator) -> Seeds:
    lesion = []
    for channel in range(len(TYPES)):
        if channel == MA and not image.ma_valid:
            lesion.append(np.zeros((0, 2), dtype=np.int64))
            continue
        points = np.argwhere(image.targets[channel] >= _POSITIVE)
        if len(points) > _MAX_SEEDS:
            points = points[rng.choice(len(points), _MAX_SEEDS, replace=False)]
        lesion.append(points)
    fov = np.argwhere(image.fov[::4, ::4]) * 4
    return Seeds(lesion, fov)


def crop(array: np.ndarray, cy: int, cx: int, tile: int) -> np.ndarray:
    """C x tile x tile window centred at (cy, cx), zero-padded beyond the image."""
    channels, height, width = array.shape
    out = np.zeros((channels, tile, tile), dtype=array.dtype)
    y0, x0 = cy - tile // 2, cx - tile // 2
    sy0, sx0 = max(0, y0), max(0, x0)
    sy1, sx1 = min(height, y0 + tile), min(width, x0 + tile)
    out[:, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = array[:, sy0:sy1, sx0:sx1]
    return out


def resized(planes: np.ndarray, side: int) -> np.ndarray:
    """C x S x S float32 -> C x side x side, bilinear (antialiased when shrinking, so a
    target stays its area fraction)."""
    out = F.interpolate(
        torch.from_numpy(planes)[None], size=(side, side), mode="bilinear", antialias=True
    )
    return out[0].numpy()


def sample_tile(
    image: data.GridImage, seeds: Seeds, config: Config, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs C x T x T float32, targets 4 x T x T float32 in 0-1), augmented."""
    present = [c for c, points in enumerate(seeds.lesion) if len(points)]
    if present and rng.random() < config.lesion_fraction:
        points = seeds.lesion[rng.choice(present)]
        cy, cx = points[rng.integers(len(points))]
        jitter = rng.integers(-config.tile // 3, config.tile // 3 + 1, size=2)
        cy, cx = cy + jitter[0], cx + jitter[1]
    else:
        cy, cx = seeds.fov[rng.integers(len(seeds.fov))]
    zoom = math.exp(rng.uniform(*np.log(config.zoom)))
    window = max(8, round(config.tile / zoom))
    inputs = crop(image.inputs, int(cy), int(cx), window).astype(np.float32)
    targets = crop(image.targets, int(cy), int(cx), window).astype(np.float32) / 255.0
    if window != config.tile:
        inputs, targets = resized(inputs, config.tile), resized(targets, config.tile).clip(0, 1)
    # Flips and quarter turns: lesions have no orientation; both eyes and any camera rotation.
    turns = int(rng.integers(4))
    inputs, targets = np.rot90(inputs, turns, (1, 2)), np.rot90(targets, turns, (1, 2))
    if rng.random() < 0.5:
        inputs, targets = inputs[:, :, ::-1], targets[:, :, ::-1]
    # Per-channel contrast and offset jitter: exposure and white balance vary by camera. A
    # colour's gain scales both its channels; its offset only the standardised one (the local
    # contrast channel has its background removed).
    gain = np.tile(rng.uniform(0.85, 1.15, size=(3, 1, 1)), (INPUT_CHANNELS // 3, 1, 1))
    gain = gain.astype(np.float32)
    shift = np.zeros((INPUT_CHANNELS, 1, 1), dtype=np.float32)
    shift[:3] = rng.uniform(-0.15, 0.15, size=(3, 1, 1))
    return np.ascontiguousarray(inputs * gain + shift), np.ascontiguousarray(targets)


def pick_pool(
    pools: dict[str, list[tuple[data.GridImage, Seeds]]], config: Config, rng: np.random.Generator
) -> list[tuple[data.GridImage, Seeds]]:
    draw = rng.random()
    if pools["negative"] and draw < config.negative_fraction:
        return pools["negative"]
    if pools["lowres"] and draw < config.negative_fraction + config.lowres_fraction:
        return pools["lowres"]
    return pools["full"]


def sample_batch(
    pools: dict[str, list[tuple[data.GridImage, Seeds]]], config: Config, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs N x C x T x T, targets N x 4 x T x T, and a N x 4 loss weight (0: unlabelled)."""
    inputs, targets, weights = [], [], []
    for _ in range(config.batch):
        pool = pick_pool(pools, config, rng)
        image, seeds = pool[rng.integers(len(pool))]
        x, y = sample_tile(image, seeds, config, rng)
        inputs.append(x)
        targets.append(y)
        weights.append([float(image.ma_valid), 1.0, 1.0, 1.0])
    return (
        torch.from_numpy(np.stack(inputs)),
        torch.from_numpy(np.stack(targets)),
        torch.tensor(weights),
    )


def compute_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    dice_when_absent: torch.Tensor,
) -> torch.Tensor:
    """Mean over types of BCE + (1 - soft Dice), each type only over its labelled tiles.

    In a batch without a type, its Dice is 1 / (1 + the sum of its probabilities): a gradient
    hundreds of times BCE's per pixel, largest on the most probable pixels, so it works as
    hard-negative mining. Held out on fold 0 that helped MA, HE and EX, but it held SE (absent
    from most batches) under the reporting floor. `dice_when_absent` (bool per type) keeps it
    for the types it names; the others learn their absence from BCE alone."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean((2, 3))
    probs = torch.sigmoid(logits)
    w = weights[:, :, None, None]
    intersection = (probs * targets * w).sum((0, 2, 3))
    reference = (targets * w).sum((0, 2, 3))
    dice = (2 * intersection + 1.0) / ((probs * w).sum((0, 2, 3)) + reference + 1.0)
    labelled = weights.sum(0).clamp(min=1.0)
    counted = (reference > 0) | dice_when_absent
    per_type = (bce * weights).sum(0) / labelled + (1.0 - dice) * counted
    return per_type[weights.sum(0) > 0].mean()


def learning_rate(config: Config, state: TrainState) -> float:
    if state.step < config.warmup:
        return config.lr * (state.step + 1) / config.warmup
    progress = state.step / config.steps
    if config.time_limit_min > 0:
        progress = max(progress, state.elapsed_s / (60 * config.time_limit_min))
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def checkpoint_path(config: Config) -> Path:
    return config.checkpoints / f"{config.output.stem}-fold-{config.fold}.ckpt"


def new_state(config: Config) -> TrainState:
    net = VesselUNet(INPUT_CHANNELS, config.widths, len(TYPES)).to(pick_device(config.device))
    net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), config.lr, weight_decay=config.weight_decay)
    return TrainState(net, optimizer)


def start_from(config: Config, state: TrainState) -> None:
    """Load --init's weights and carry its runs over; refuse another fold's model, whose
    training images may be this fold's held-out ones, and one trained on another grid."""
    assert config.init is not None
    earlier = load_verified(config.init)
    fold = earlier.manifest["training_data"]["fold"]
    if fold != config.fold:
        raise SystemExit(f"--init {config.init} was trained for fold {fold}, not {config.fold}")
    grid_scale = earlier.manifest["architecture"].get("grid_scale", 1.0)
    if grid_scale != config.grid_scale:
        raise SystemExit(
            f"--init {config.init} has grid scale {grid_scale}, not {config.grid_scale}"
        )
    state.net.load_state_dict({k: v.float() for k, v in earlier.state.items()})
    state.earlier_runs = earlier.manifest["training"]["runs"]


def save_checkpoint(config: Config, state: TrainState) -> None:
    path = checkpoint_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "net": state.net.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "step": state.step,
            "elapsed_s": state.elapsed_s,
            "losses": state.losses,
        },
        path,
    )


def load_checkpoint(config: Config, state: TrainState) -> TrainState:
    saved = torch.load(
        checkpoint_path(config), weights_only=False, map_location=pick_device(config.device)
    )
    state.net.load_state_dict(saved["net"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.step, state.elapsed_s, state.losses = saved["step"], saved["elapsed_s"], saved["losses"]
    return state


def out_of_time(config: Config, state: TrainState) -> bool:
    return config.time_limit_min > 0 and state.elapsed_s >= 60 * config.time_limit_min


def train(config: Config, state: TrainState) -> TrainState:
    rng = np.random.default_rng(config.seed + state.step)  # a resumed run draws new tiles
    torch.manual_seed(config.seed + state.step)
    pools = {
        kind: [
            (image, seeds_of(image, rng))
            for image in (
                data.cached(i, kind, config.data_root, config.cache, config.grid_scale) for i in ids
            )
        ]
        for kind, ids in training_ids(config).items()
    }
    state.net.train()
    device = pick_device(config.device)
    dice_when_absent = torch.tensor(
        [SHORT_NAMES[t] in config.dice_when_absent for t in TYPES], device=device
    )
    running: list[float] = []
    while state.step < config.steps and not out_of_time(config, state):
        start = time.perf_counter()
        for group in state.optimizer.param_groups:
            group["lr"] = learning_rate(config, state)
        inputs, targets, weights = sample_batch(pools, config, rng)
        inputs = inputs.to(device).contiguous(memory_format=torch.channels_last)
        targets, weights = targets.to(device), weights.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            logits = state.net(inputs)
        loss = compute_loss(logits, targets, weights, dice_when_absent)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.step += 1
        state.elapsed_s += time.perf_counter() - start
        running.append(float(loss.detach()))
        if state.step % config.log_every == 0:
            state.losses.append(float(np.mean(running)))
            print(
                f"step {state.step} loss {np.mean(running):.4f} "
                f"lr {learning_rate(config, state):.2e} {state.elapsed_s:.0f}s",
                flush=True,
            )
            running = []
        if state.step % config.checkpoint_every == 0:
            save_checkpoint(config, state)
    save_checkpoint(config, state)
    return state


def export(config: Config, state: TrainState) -> dict:
    """fp16 safetensors + manifest (data ids, recipe, wall time); metrics come from the bench."""
    ids = training_ids(config)
    training_data = {
        "IDRiD-seg": ids["full"],
        "IDRiD-seg-512": ids["lowres"],
        "negatives (other cameras, trained as lesion-free)": ids["negative"],
        "held_out": [] if config.fold == "all" else list(data.fold_ids(int(config.fold))),
        "fold": config.fold,
    }
    recipe = {k: shown(v) for k, v in asdict(config).items()}
    machine = (
        f"{platform.machine()} {pick_device(config.device)}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    final_loss = state.losses[-1] if state.losses else None
    this_run = {
        "fine_tunes": shown(config.init) if config.init else None,
        "steps": state.step,
        "wall_time_s": round(state.elapsed_s, 1),
        "final_loss": final_loss,
        "machine": machine,
        "recipe": recipe,
        "training_data": training_data,
    }
    runs = [*state.earlier_runs, this_run]
    manifest = {
        "name": config.output.stem,
        "version": VERSION,
        "task": TASK,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "architecture": {
            "type": "VesselUNet",
            "in_channels": INPUT_CHANNELS,
            "widths": list(config.widths),
            "classes": len(TYPES),
            "outputs": list(NAMES),
            "activation": "sigmoid per output",
            "work_fov_diameter_px": WORK_FOV_DIAMETER,
            "grid_scale": config.grid_scale,
        },
        "thresholds": dict.fromkeys(NAMES, 0.5),
        "training_data": training_data,
        "recipe": recipe,
        "training": {  # totals over every run since the model was initialised
            "steps": sum(run["steps"] for run in runs),
            "wall_time_s": round(sum(run["wall_time_s"] for run in runs), 1),
            "final_loss": final_loss,
            "machine": machine,
            "runs": runs,
        },
        "metrics": {},
        "license": "weights trained on IDRiD (CC BY 4.0)",
    }
    state16 = {
        k: v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()
        for k, v in state.net.state_dict().items()
    }
    return save_with_manifest(state16, config.output, manifest)


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    if config.threads:
        torch.set_num_threads(config.threads)
    state = new_state(config)
    if config.init:
        start_from(config, state)
    if config.resume and checkpoint_path(config).is_file():
        state = load_checkpoint(config, state)
    state = train(config, state)
    manifest = export(config, state)
    print(json.dumps(manifest["training"], indent=2), flush=True)


if __name__ == "__main__":
    main()
