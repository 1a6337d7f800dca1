"""Train the joint vessel + artery/vein U-Net and export it with a manifest.

    python -m training.segmentation.train_vessels --steps 8000 --out-dir var/train/vessels

Random augmented patches from the training split (datasets.py) feed `VesselUNet`; the loss is
BCE + soft Dice on the vessel channel (DRIVE and STARE pixels inside the FOV) plus artery-vs-
vein cross-entropy on labelled vessel pixels (RITE on DRIVE, LES-AV, AVRDB; crossings are
ignored). AdamW, linear warm-up then cosine decay, bf16 autocast where native. Checkpoints are
written every --checkpoint-every steps and resumed with --resume; --init WEIGHTS fine-tunes an
exported model (its weights, with a fresh optimiser and schedule of --steps; the manifest keeps
its earlier runs and wall time). At the end the weights are
written as fp16 safetensors with a manifest; the vessel threshold is chosen on the training
images and the held-out sets are evaluated for the manifest's metrics.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from services.analysis.engine.model_files import save_with_manifest
from services.analysis.engine.nets import ARTERY, VEIN, VESSEL, VesselUNet
from services.analysis.engine.preprocess import CANONICAL_SIDE
from services.analysis.engine.runtime import bf16_is_native, pick_device
from services.analysis.engine.vessels import TASK, WEIGHTS_DIR, VesselSegmenter
from training.segmentation import datasets, evaluate
from training.segmentation.sampling import (
    IGNORE,
    Augmentation,
    Batch,
    CanonicalImage,
    canonical_image,
    sample_batch,
)

VERSION = "1.0.0"


@dataclass
class Config:
    steps: int = 8000
    batch: int = 8
    patch: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 200
    av_weight: float = 1.0
    widths: tuple[int, ...] = (16, 32, 64, 128, 256)
    seed: int = 0
    bf16: bool | None = None  # None: where native (runtime.bf16_is_native)
    device: str = "auto"  # "auto": CUDA when present, else the CPU
    threads: int = 0  # 0: torch's default (one per core)
    data_root: Path = datasets.DEFAULT_ROOT
    out_dir: Path = Path("var/train/vessels")
    resume: Path | None = None
    init: Path | None = None
    checkpoint_every: int = 500
    log_every: int = 50
    name: str = "vessel-av-unet"
    weights_dir: Path = WEIGHTS_DIR
    export: bool = True
    augmentation: Augmentation = field(default_factory=Augmentation)

    def __post_init__(self) -> None:
        if self.bf16 is None:
            self.bf16 = bf16_is_native(pick_device(self.device))


@dataclass
class TrainState:
    net: VesselUNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    step: int = 0
    elapsed_s: float = 0.0  # training wall time, summed over resumed runs
    prior_steps: int = 0  # steps of the exported model a fine-tune started from (--init)
    losses: list[float] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)  # one entry per (resumed) run: its recipe

    @property
    def total_steps(self) -> int:
        """Steps since the model was initialised, a fine-tune's earlier ones included."""
        return self.prior_steps + self.step


def parse_args(argv: list[str] | None = None) -> Config:
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=defaults.steps, help="total optimiser steps")
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--patch", type=int, default=defaults.patch, help="patch side, px")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--av-weight", type=float, default=defaults.av_weight)
    parser.add_argument("--widths", default=",".join(map(str, defaults.widths)))
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        help="bf16 autocast (default: where native, runtime.bf16_is_native)",
    )
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--data-root", type=Path, default=defaults.data_root)
    parser.add_argument("--out-dir", type=Path, default=defaults.out_dir)
    parser.add_argument("--resume", type=Path, help="checkpoint to continue from")
    parser.add_argument("--init", type=Path, help="exported .safetensors to fine-tune")
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    parser.add_argument("--log-every", type=int, default=defaults.log_every)
    parser.add_argument("--name", default=defaults.name, help="exported file stem")
    parser.add_argument("--weights-dir", type=Path, default=defaults.weights_dir)
    parser.add_argument("--export", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--device", default=defaults.device, choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    values = vars(args)
    values["widths"] = tuple(int(width) for width in args.widths.split(","))
    return Config(**values)


def load_images(samples: list[datasets.Sample], seed: int) -> list[CanonicalImage]:
    generator = torch.Generator().manual_seed(seed)
    return [canonical_image(sample, generator) for sample in samples]


def new_state(config: Config) -> TrainState:
    torch.manual_seed(config.seed)
    net = VesselUNet(3, config.widths).to(pick_device(config.device))
    net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    return TrainState(net, optimizer, scheduler, torch.Generator().manual_seed(config.seed))


def _schedule(config: Config) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup))
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def compute_loss(logits: torch.Tensor, batch: Batch, av_weight: float) -> dict[str, torch.Tensor]:
    """BCE + soft Dice on vessels where labelled; A/V cross-entropy on labelled vessel pixels."""
    vessel = logits[:, VESSEL : VESSEL + 1].float()
    weight = batch.vessel_weight
    counted = weight.sum()
    zero = vessel.sum() * 0  # keeps the graph when a batch has no labels of a kind
    if counted > 0:
        bce = F.binary_cross_entropy_with_logits(vessel, batch.vessel, reduction="none") * weight
        bce = bce.sum() / counted
        probability = torch.sigmoid(vessel) * weight
        overlap = (probability * batch.vessel).sum()
        dice = 1 - (2 * overlap + 1) / (probability.sum() + (batch.vessel * weight).sum() + 1)
    else:
        bce = dice = zero
    if (batch.av != IGNORE).any():
        av = F.cross_entropy(logits[:, [ARTERY, VEIN]].float(), batch.av, ignore_index=IGNORE)
    else:
        av = zero
    return {"loss": bce + dice + av_weight * av, "bce": bce, "dice": dice, "av": av}


def train(config: Config, images: list[CanonicalImage], state: TrainState) -> TrainState:
    """Run from state.step to config.steps, checkpointing and logging on the way."""
    config.out_dir.mkdir(parents=True, exist_ok=True)
    run = {
        "from_step": state.total_steps,
        "threads": torch.get_num_threads(),
        **_recipe(config),
    }
    if config.init:
        run["fine_tunes"] = f"{config.init.name} ({state.prior_steps} steps)"
    state.runs.append(run)
    state.net.train()
    device = pick_device(config.device)
    window: dict[str, float] = {}
    started = time.perf_counter()
    window_start = started
    while state.step < config.steps:
        batch = sample_batch(
            images, config.batch, config.patch, state.generator, config.augmentation
        )
        batch = batch.to(device)
        inputs = batch.inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            logits = state.net(inputs)
        parts = compute_loss(logits, batch, config.av_weight)
        state.optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        state.optimizer.step()
        state.scheduler.step()
        state.step += 1
        state.losses.append(parts["loss"].item())
        for key, value in parts.items():
            window[key] = window.get(key, 0.0) + value.item()
        if state.step % config.log_every == 0 or state.step == config.steps:
            now = time.perf_counter()
            count = (state.step - 1) % config.log_every + 1
            means = " ".join(f"{key} {value / count:.4f}" for key, value in window.items())
            lr = state.scheduler.get_last_lr()[0]
            speed = count / (now - window_start)
            print(
                f"step {state.step}/{config.steps} {means} lr {lr:.2e} {speed:.2f} steps/s",
                flush=True,
            )
            window, window_start = {}, now
        if state.step % config.checkpoint_every == 0 or state.step == config.steps:
            state.elapsed_s += time.perf_counter() - started
            started = time.perf_counter()
            run["to_step"] = state.total_steps
            save_checkpoint(state, config.out_dir / "checkpoint.pt")
    state.elapsed_s += time.perf_counter() - started
    run["to_step"] = state.total_steps
    return state


def save_checkpoint(state: TrainState, path: Path) -> None:
    temporary = path.with_suffix(".tmp")
    torch.save(
        {
            "net": state.net.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "generator": state.generator.get_state(),
            "step": state.step,
            "elapsed_s": state.elapsed_s,
            "prior_steps": state.prior_steps,
            "losses": state.losses,
            "runs": json.dumps(state.runs),
        },
        temporary,
    )
    temporary.replace(path)  # a crash mid-write never leaves a truncated checkpoint


def load_checkpoint(config: Config, path: Path) -> TrainState:
    state = new_state(config)
    saved = torch.load(path, weights_only=True, map_location=pick_device(config.device))
    state.net.load_state_dict(saved["net"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.generator.set_state(saved["generator"])
    state.step = int(saved["step"])
    state.elapsed_s = float(saved["elapsed_s"])
    state.prior_steps = int(saved.get("prior_steps", 0))
    state.losses = list(saved["losses"])
    state.runs = json.loads(saved.get("runs", "[]"))
    return state


def start_from(state: TrainState, weights: Path) -> None:
    """Fine-tune an exported model: its weights, runs, steps and wall time carry over."""
    state.net.load_state_dict({k: v.float() for k, v in load_file(weights).items()})
    earlier = json.loads(weights.with_suffix(".json").read_text())["training"]
    state.runs = list(earlier["runs"])
    state.prior_steps = int(earlier["steps"])
    state.elapsed_s = float(earlier["wall_time_s"])


def export(config: Config, state: TrainState, samples: list[datasets.Sample]) -> dict:
    """fp16 safetensors + manifest; threshold from training images, held-out metrics."""
    weights = config.weights_dir / f"{config.name}.safetensors"
    state16 = {
        key: value.detach().cpu().half() if value.is_floating_point() else value.detach().cpu()
        for key, value in state.net.state_dict().items()
    }
    manifest = save_with_manifest(state16, weights, _manifest(config, state, samples))
    segmenter = VesselSegmenter.load(weights)
    vessel_training = [sample for sample in samples if sample.vessel is not None]
    training_scores = evaluate.score_vessels(segmenter, vessel_training)
    threshold = evaluate.best_threshold(training_scores)
    segmenter.threshold = threshold
    metrics = {"training_vessels": _brief(evaluate.vessel_report(training_scores, threshold))}
    metrics |= held_out_metrics(segmenter, config.data_root, threshold)
    manifest |= {"threshold": threshold, "metrics": metrics}
    weights.with_suffix(".json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def held_out_metrics(segmenter: VesselSegmenter, root: Path, threshold: float) -> dict:
    """Reporting sets (never used to choose anything)."""
    drive_test = datasets.drive(root, "test")
    return {
        "drive_test": _brief(
            evaluate.vessel_report(evaluate.score_vessels(segmenter, drive_test), threshold)
        ),
        "stare_test": _brief(
            evaluate.vessel_report(
                evaluate.score_vessels(segmenter, datasets.stare(root, "test")), threshold
            )
        ),
        "les_av_test": _brief(evaluate.av_report(segmenter, datasets.les_av(root, "test"))),
        "rite_test": _brief(evaluate.av_report(segmenter, drive_test)),
    }


def _brief(report: dict) -> dict:
    """Headline numbers only (per-image lists live in bench/results)."""
    return {
        key: round(value, 4) if isinstance(value, float) else value
        for key, value in report.items()
        if not isinstance(value, dict)
    }


def _manifest(config: Config, state: TrainState, samples: list[datasets.Sample]) -> dict:
    data: dict[str, dict[str, list[str]]] = {}
    for sample in samples:
        roles = data.setdefault(sample.dataset, {"vessel": [], "artery_vein": []})
        if sample.vessel is not None:
            roles["vessel"].append(sample.image_id)
        if sample.av is not None:
            roles["artery_vein"].append(sample.image_id)
    return {
        "name": config.name,
        "version": VERSION,
        "task": TASK,
        "architecture": {
            "type": "VesselUNet",
            "in_channels": 3,
            "widths": list(config.widths),
            "classes": 3,
            "outputs": ["vessel logit (sigmoid)", "artery logit", "vein logit (softmax pair)"],
            "parameters": sum(p.numel() for p in state.net.parameters()),
            "storage": "float16",
        },
        "preprocessing": {
            "function": "services.analysis.engine.preprocess.network_input",
            "fov": "shared.imaging.fov.detect_field_of_view",
            "canonical_side": CANONICAL_SIDE,
            "normalisation": "per-channel mean/std of FOV pixels, 0 outside the FOV",
        },
        "training": {
            "data": data,
            "splits": "training/segmentation/datasets.py docstring",
            "recipe": _recipe(config),
            "runs": state.runs,
            "steps": state.total_steps,
            "wall_time_s": round(state.elapsed_s, 1),
            "final_loss_mean_last_200": round(float(np.mean(state.losses[-200:])), 4),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}",
        },
        "date": dt.date.today().isoformat(),
    }


def _recipe(config: Config) -> dict:
    """The hyperparameters of a run (paths and switches left out)."""
    skip = {"data_root", "out_dir", "resume", "weights_dir", "export", "name", "threads", "init"}
    return {key: value for key, value in asdict(config).items() if key not in skip}


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    if config.threads:
        torch.set_num_threads(config.threads)
    samples = datasets.training_samples(config.data_root)
    if not samples:
        raise SystemExit(f"no training data under {config.data_root}")
    images = load_images(samples, config.seed)
    print(f"{len(images)} training images on the {CANONICAL_SIDE} px grid", flush=True)
    if config.resume:
        state = load_checkpoint(config, config.resume)
    else:
        state = new_state(config)
        if config.init:
            start_from(state, config.init)
    state = train(config, images, state)
    print(f"trained {state.step} steps in {state.elapsed_s:.0f} s", flush=True)
    if config.export:
        manifest = export(config, state, samples)
        print(json.dumps(manifest["metrics"], indent=2), flush=True)


if __name__ == "__main__":
    main()
