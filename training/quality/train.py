"""Train the quality grader: `python -m training.quality.train [--steps N] [--out DIR]`.

Labels come from controlled degradations (training/quality/degrade.py) of real fundus
photographs plus non-fundus photographs and blank frames (reject); there are no human
quality labels in our data, and the model card says so.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from torch import nn

from services.analysis.engine.model_files import save_with_manifest
from services.analysis.engine.quality import (
    GRADES,
    QUALITY_SIDE,
    QualityNet,
    image_measures,
    to_tensor,
)
from training.quality.data import (
    FUNDUS_FOLDERS,
    NON_FUNDUS_HELD_OUT,
    NON_FUNDUS_TRAIN,
    QualityImages,
    load_split,
)
from training.quality.degrade import GOOD, REJECT, USABLE, degrade, photometric_jitter

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = REPO / "services" / "analysis" / "weights" / "quality.safetensors"
# Of the reject samples: degraded fundus, non-fundus photographs, blank frames, featureless
# fundus-coloured discs (the silhouette of a photograph with nothing gradable inside).
REJECT_SOURCES = (0.5, 0.25, 0.1, 0.15)
SYNTHETIC_REJECTS_PER_KIND = 10  # blank frames and featureless discs in the held-out set
GRADE_SHARES = (0.3, 0.3, 0.4)

app = typer.Typer(add_completion=False)


def _blank_frame(rng: np.random.Generator) -> np.ndarray:
    """Black, uniform or gradient frames, with noise: what a camera sends when it misfires."""
    level = rng.uniform(0, 1, 3).astype(np.float32) * (0.15 if rng.random() < 0.5 else 1.0)
    frame = np.broadcast_to(level, (QUALITY_SIDE, QUALITY_SIDE, 3)).copy()
    if rng.random() < 0.5:
        frame *= np.linspace(0.3, 1.0, QUALITY_SIDE, dtype=np.float32)[None, :, None]
    return np.clip(frame + rng.normal(0, 0.02, frame.shape).astype(np.float32), 0, 1)


def _featureless_disc(images: QualityImages, rng: np.random.Generator) -> np.ndarray:
    """A round field of a real photograph's mean colour, shaded and noisy, with no anatomy."""
    pool = list(images.fundus.values())
    base = pool[rng.integers(len(pool))].astype(np.float32) / 255.0
    inside = base.max(axis=2) > 0.05
    colour = base[inside].mean(axis=0) * rng.uniform(0.7, 1.3, 3)
    side = QUALITY_SIDE
    yy, xx = (np.mgrid[:side, :side] - side / 2) / (side / 2)
    radius = rng.uniform(0.75, 1.0)
    distance = np.hypot(xx - rng.uniform(-0.1, 0.1), yy - rng.uniform(-0.1, 0.1)) / radius
    shading = 1.0 - rng.uniform(0.0, 0.6) * distance**2
    frame = colour[None, None, :] * shading[..., None] * (distance < 1.0)[..., None]
    if rng.random() < 0.3:  # a bright spot where a disc would be
        spot = np.hypot(xx - rng.uniform(-0.5, 0.5), yy - rng.uniform(-0.3, 0.3)) < 0.12
        frame[spot & (distance < 1.0)] *= 1.6
    frame += rng.normal(0, rng.uniform(0.0, 0.03), frame.shape) * (distance < 1.0)[..., None]
    return np.clip(frame, 0, 1).astype(np.float32)


def sample(images: QualityImages, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    grade = int(rng.choice(3, p=GRADE_SHARES))
    source = int(rng.choice(len(REJECT_SOURCES), p=REJECT_SOURCES)) if grade == REJECT else 0
    if source == 1:
        pool = list(images.non_fundus.values())
        return photometric_jitter(pool[rng.integers(len(pool))] / 255.0, rng), REJECT
    if source == 2:
        return _blank_frame(rng), REJECT
    if source == 3:
        return _featureless_disc(images, rng), REJECT
    pool = list(images.fundus.values())
    base = pool[rng.integers(len(pool))].astype(np.float32) / 255.0
    return degrade(base, grade, rng), grade


def batch(
    images: QualityImages, size: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [sample(images, rng) for _ in range(size)]
    x = torch.stack([to_tensor((np.clip(img, 0, 1) * 255).astype(np.uint8)) for img, _ in pairs])
    return x, torch.tensor([label for _, label in pairs])


def evaluation_set(images: QualityImages, variants: int = 3) -> tuple[torch.Tensor, np.ndarray]:
    """Held-out images at every grade with fixed seeds, plus non-fundus and blank frames."""
    rng = np.random.default_rng(1234)
    xs, ys = [], []
    for base in images.fundus.values():
        for grade in (GOOD, USABLE, REJECT):
            for _ in range(variants):
                xs.append(degrade(base.astype(np.float32) / 255.0, grade, rng))
                ys.append(grade)
    for image in images.non_fundus.values():
        xs.append(image.astype(np.float32) / 255.0)
        ys.append(REJECT)
    for _ in range(SYNTHETIC_REJECTS_PER_KIND):
        xs += [_blank_frame(rng), _featureless_disc(images, rng)]
        ys += [REJECT, REJECT]
    tensor = torch.stack([to_tensor((np.clip(x, 0, 1) * 255).astype(np.uint8)) for x in xs])
    return tensor, np.array(ys)


def metrics(net: QualityNet, x: torch.Tensor, y: np.ndarray) -> dict[str, float]:
    net.eval()
    with torch.inference_mode():
        predicted = torch.cat([net(chunk).argmax(1) for chunk in x.split(64)]).numpy()
    net.train()
    out = {"accuracy": float((predicted == y).mean())}
    for index, grade in enumerate(GRADES):
        tp = float(((predicted == index) & (y == index)).sum())
        precision = tp / max(1.0, float((predicted == index).sum()))
        recall = tp / max(1.0, float((y == index).sum()))
        out[f"f1_{grade.value}"] = 2 * precision * recall / max(1e-9, precision + recall)
    out["macro_f1"] = float(np.mean([out[f"f1_{g.value}"] for g in GRADES]))
    first = y.size - 2 * SYNTHETIC_REJECTS_PER_KIND - len(NON_FUNDUS_HELD_OUT)
    out["non_fundus_blank_featureless_rejected"] = float((predicted[first:] == REJECT).mean())
    return out


def normal_ranges(images: QualityImages, rng: np.random.Generator) -> dict[str, list[float]]:
    """2nd-98th percentile of each measure on clean (jittered) training images, widened 10 %."""
    rows = [
        image_measures((photometric_jitter(img / 255.0, rng) * 255).astype(np.uint8))
        for img in images.fundus.values()
    ]
    ranges = {}
    for name in rows[0]:
        low, high = np.percentile([row[name] for row in rows], [2, 98])
        pad = 0.1 * (high - low)
        ranges[name] = [round(float(low - pad), 4), round(float(high + pad), 4)]
    return ranges


@dataclass
class Run:
    """What a checkpoint carries between interrupted segments of one training run."""

    net: QualityNet
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    rng: np.random.Generator
    step: int = 0
    wall_s: float = 0.0

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rng": self.rng.bit_generator.state,
            "step": self.step,
            "wall_s": self.wall_s,
        }
        torch.save(state, path)

    def restore(self, path: Path) -> None:
        state = torch.load(path, weights_only=False)
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.rng.bit_generator.state = state["rng"]
        self.step, self.wall_s = state["step"], state["wall_s"]


@app.command()
def main(
    data_root: Annotated[Path, typer.Option()] = REPO.parent / "shared" / "datasets",
    steps: Annotated[int, typer.Option()] = 1500,
    batch_size: Annotated[int, typer.Option()] = 24,
    lr: Annotated[float, typer.Option()] = 2e-3,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int, typer.Option()] = 2,
    checkpoint: Annotated[Path, typer.Option()] = REPO / "var" / "quality" / "checkpoint.pt",
    stop_after: Annotated[
        int | None, typer.Option(help="Stop at this step (checkpointed); run again to resume")
    ] = None,
    out: Annotated[Path, typer.Option()] = WEIGHTS,
) -> None:
    """Train (resuming from --checkpoint if it exists), evaluate held out, export."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    started = time.time()
    train, held_out = load_split(data_root)
    net = QualityNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    run = Run(net, optimizer, schedule, np.random.default_rng(seed))
    if checkpoint.exists():
        run.restore(checkpoint)
        typer.echo(f"resumed at step {run.step}")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    last = min(steps, stop_after or steps)
    while run.step < last:
        x, y = batch(train, batch_size, run.rng)
        loss = loss_fn(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        run.step += 1
        if run.step % 50 == 0 or run.step == last:
            typer.echo(f"step {run.step}/{steps} loss {loss.item():.4f}")
            run.wall_s += time.time() - started
            started = time.time()
            run.save(checkpoint)
    if run.step < steps:
        typer.echo(f"stopped at step {run.step} of {steps}; run again to resume")
        return
    held_x, held_y = evaluation_set(held_out)
    scores = metrics(net, held_x, held_y)
    typer.echo(json.dumps(scores, indent=1))
    manifest = {
        "name": "quality",
        "version": "1.0.0",
        "task": "image quality grade: good / usable / reject (EyeQ-style)",
        "architecture": {
            "type": "QualityNet",
            "widths": [16, 32, 48, 64, 96],
            "input": f"{QUALITY_SIDE}x{QUALITY_SIDE} RGB, [0,1]-0.5",
        },
        "training_data": {
            "note": "no human quality labels: grades come from controlled degradations "
            "(blur, exposure, uneven illumination, haze, noise, occlusion, off-centre) of "
            "real fundus photographs, plus non-fundus photographs, blank frames and "
            "featureless fundus-coloured discs as reject",
            "fundus_folders": list(FUNDUS_FOLDERS),
            "fundus_train_images": sorted(train.fundus),
            "fundus_held_out_images": sorted(held_out.fundus),
            "non_fundus_train": list(NON_FUNDUS_TRAIN),
            "non_fundus_held_out": list(NON_FUNDUS_HELD_OUT),
        },
        "recipe": {
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "optimizer": "AdamW + one-cycle",
            "loss": "cross-entropy, smoothing 0.05",
            "grade_shares": GRADE_SHARES,
            "reject_sources": REJECT_SOURCES,
        },
        "metrics": {"held_out": {k: round(v, 4) for k, v in scores.items()}},
        "normal_ranges": normal_ranges(train, run.rng),
        "train_wall_s": round(run.wall_s + time.time() - started, 1),
        "date": dt.date.today().isoformat(),
        "license": "weights: Apache-2.0; trained on research-use datasets (see SOURCE.txt)",
    }
    state = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    written = save_with_manifest(state, out, manifest)
    typer.echo(f"wrote {out} (sha256 {written['sha256'][:12]}, {written['bytes']} bytes)")


if __name__ == "__main__":
    app()
