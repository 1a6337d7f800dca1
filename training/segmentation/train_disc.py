"""Train the optic disc locator and the disc/cup segmenter; evaluate a CV fold end to end.

    python -m training.segmentation.train_disc --fold 0 --out var/disc/fold0     # one CV fold
    python -m training.segmentation.train_disc --fold -1 --out var/disc/all --export

`--fold k` trains both networks without the 10 Drishti-GS1 images of fold k (folds: fixed,
seeded partition of the 50 training ids, `disc_data.folds`), then runs the full inference
pipeline (locator -> crop -> segmenter, as served) on those 10 and writes metrics.json.
`--fold -1` trains on all 50; `--export` writes the served weights and manifests, with the
cross-validation results gathered from `--cv-dir`/fold*/metrics.json.

Checkpoints (`<out>/<stage>.ckpt`, every `--checkpoint-every` steps) hold the network,
optimiser, step and random state: `--resume` continues a stopped run where it left off.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from services.analysis.engine import disc
from services.analysis.engine.disc import DiscSegmenter, locator_net, segmenter_net, standardize
from services.analysis.engine.model_files import save_with_manifest
from services.analysis.engine.nets import VesselUNet
from services.analysis.engine.runtime import bf16_is_native
from shared.imaging.ingest import ingest
from tests.conftest import DATASETS
from training.segmentation import disc_data
from training.segmentation.disc_data import MAJORITY, read_drishti

CUP_DICE_WEIGHT = 2.0  # the cup is the hard, CDR-deciding structure: weight its overlap more
VERSION = "1.0.0"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fold", type=int, default=-1, help="CV fold 0-4 held out; -1: all 50")
    parser.add_argument("--steps", type=int, default=1200, help="segmenter steps")
    parser.add_argument("--locator-steps", type=int, default=400)
    parser.add_argument("--crop-size", type=int, default=disc.SEGMENTER_SIDE)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        help="bf16 autocast (default: where native, runtime.bf16_is_native)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path("var/disc/cache.npz"))
    parser.add_argument("--datasets", type=Path, default=DATASETS)
    parser.add_argument("--export", action="store_true", help="write the served weights")
    parser.add_argument("--cv-dir", type=Path, default=Path("var/disc"))
    return parser.parse_args(argv)


def dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice per sample and channel (B x C)."""
    inter = (prob * target).sum(dim=(2, 3))
    return 1 - (2 * inter + 1) / (prob.sum(dim=(2, 3)) + target.sum(dim=(2, 3)) + 1)


def seg_loss(logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """BCE on the experts' soft maps (keeps their disagreement) + Dice on the majority."""
    bce = F.binary_cross_entropy_with_logits(logits, soft)
    dice = dice_loss(torch.sigmoid(logits), (soft >= 0.5).float()).mean(dim=0)
    weights = torch.ones(dice.shape[0])
    weights[-1] = CUP_DICE_WEIGHT if dice.shape[0] == 2 else 1.0
    return bce + (dice * weights).sum() / weights.sum()


class Stage:
    """One network's training loop with checkpoint/resume."""

    def __init__(self, name: str, net: VesselUNet, args: argparse.Namespace, steps: int) -> None:
        self.name, self.steps, self.args = name, steps, args
        self.net = net.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
        self.generator = torch.Generator().manual_seed(args.seed)
        self.step, self.losses, self.wall_s = 0, [], 0.0
        self.path = args.out / f"{name}.ckpt"
        if args.resume and self.path.is_file():
            self._load()

    def lr_at(self, step: int) -> float:
        """Linear warm-up over 5 %, then cosine to 2 % of the peak."""
        warm = max(1, self.steps // 20)
        if step < warm:
            return self.args.lr * (step + 1) / warm
        progress = (step - warm) / max(1, self.steps - warm)
        return self.args.lr * (0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi * progress)))

    def run(self, batches: Any) -> None:
        start = time.monotonic() - self.wall_s
        self.net.train()
        while self.step < self.steps:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(self.step)
            images, targets = batches(self.generator)
            with torch.autocast("cpu", torch.bfloat16, enabled=self.args.bf16):
                logits = self.net(standardize(images).contiguous(memory_format=torch.channels_last))
            loss = seg_loss(logits.float(), targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.losses.append(float(loss.detach()))
            self.step += 1
            self.wall_s = time.monotonic() - start
            if self.step % 25 == 0:
                recent = float(np.mean(self.losses[-25:]))
                print(
                    f"{self.name} step {self.step}/{self.steps} loss {recent:.4f} "
                    f"{self.wall_s / self.step:.2f} s/step",
                    flush=True,
                )
            if self.step % self.args.checkpoint_every == 0 or self.step == self.steps:
                self._save()
        self.net.eval()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "step": self.step,
            "losses": self.losses,
            "wall_s": self.wall_s,
        }
        torch.save(state, self.path.with_suffix(".tmp"))
        self.path.with_suffix(".tmp").replace(self.path)  # never a half-written checkpoint

    def _load(self) -> None:
        state = torch.load(self.path, weights_only=False)
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step, self.losses, self.wall_s = state["step"], state["losses"], state["wall_s"]
        print(f"{self.name}: resumed at step {self.step}", flush=True)


def load_cache(args: argparse.Namespace) -> dict[str, np.ndarray]:
    if not args.cache.is_file():
        disc_data.build_cache(args.datasets, args.cache)
    with np.load(args.cache) as cache:
        return {key: cache[key] for key in cache.files}


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x C -> float N x C x H x W in 0-1."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def split(cache: dict[str, np.ndarray], fold: int) -> tuple[list[str], list[str]]:
    ids = [str(i) for i in cache["drishti_ids"]]
    if fold < 0:
        return ids, []
    test = disc_data.folds(ids)[fold]
    return [i for i in ids if i not in test], test


def train_locator(
    args: argparse.Namespace, cache: dict[str, np.ndarray], rows: np.ndarray
) -> Stage:
    drishti = cache["drishti_loc_images"][rows]
    images = to_float(np.concatenate([drishti, cache["idrid_loc_images"]]))
    masks = np.concatenate([cache["drishti_loc_masks"][rows], cache["idrid_loc_masks"]])
    targets = torch.from_numpy(masks[:, None] > 127).float()
    stage = Stage("locator", locator_net(), args, args.locator_steps)
    stage.run(lambda g: disc_data.locator_batch(images, targets, args.batch, g))
    return stage


def train_segmenter(
    args: argparse.Namespace, cache: dict[str, np.ndarray], rows: np.ndarray
) -> Stage:
    canvases = to_float(cache["canvases"][rows])
    maps = torch.from_numpy(cache["soft_maps"][rows]).float().div_(255.0)
    stage = Stage("segmenter", segmenter_net(), args, args.steps)
    stage.run(lambda g: disc_data.segmenter_batch(canvases, maps, args.batch, args.crop_size, g))
    return stage


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = pred.sum() + truth.sum()
    return float(2 * (pred & truth).sum() / total) if total else 1.0


def evaluate_case(segmenter: DiscSegmenter, datasets: Path, image_id: str) -> dict[str, Any]:
    """The served pipeline on the ingested photograph vs the experts' majority."""
    case = read_drishti(datasets, image_id)
    ingested = ingest(case.image_path.read_bytes())
    fov = ingested.info.field_of_view
    rows = slice(fov.crop_y0, fov.crop_y1)
    cols = slice(fov.crop_x0, fov.crop_x1)
    disc_truth = case.disc_soft[rows, cols] >= MAJORITY
    cup_truth = case.cup_soft[rows, cols] >= MAJORITY
    result = segmenter.analyse(ingested.rgb)
    return {
        "image_id": image_id,
        "found": result.found,
        "disc_dice": dice(result.disc, disc_truth),
        "cup_dice": dice(result.cup, cup_truth),
        "vcdr": result.vertical_cdr,
        "expert_vcdr": case.expert_cdr,
        "vcdr_abs_error": abs(result.vertical_cdr - case.expert_cdr)
        if result.vertical_cdr is not None
        else None,
        "confidence": result.confidence,
    }


def summarize(cases: list[dict[str, Any]]) -> dict[str, float]:
    errors = [c["vcdr_abs_error"] for c in cases]
    return {
        "images": len(cases),
        "found": sum(c["found"] for c in cases),
        "disc_dice": float(np.mean([c["disc_dice"] for c in cases])),
        "cup_dice": float(np.mean([c["cup_dice"] for c in cases])),
        # A missed disc counts as the worst possible CDR error (1.0), never silently dropped.
        "vcdr_mae": float(np.mean([1.0 if e is None else e for e in errors])),
    }


LOCATOR_RECIPE = {
    "input": "FOV-cropped photograph padded to a square, 256 px, per-channel z-score over "
    "non-black pixels",
    "augmentation": "zoom 0.6-1.4, rotation +-30 deg, shift +-25 %, horizontal flip, "
    "gamma 0.67-1.5, channel gain +-15 %, noise",
    "loss": "BCE + soft Dice on the disc mask (Drishti majority, IDRiD disc)",
}
SEGMENTER_RECIPE = {
    "input": f"square of {disc.CROP_DD} located disc diameters around the located centre, "
    "per-channel z-score over non-black pixels",
    "augmentation": "crop side x0.75-1.33, centre off by up to 0.35 DD (locator error), "
    "rotation +-15 deg, horizontal flip, gamma 0.67-1.5, channel gain +-15 %, noise",
    "loss": "BCE on expert soft maps + soft Dice on majority (cup Dice x2)",
}


def manifest(
    name: str, task: str, stage: Stage, args: argparse.Namespace, data: dict, side: int
) -> dict[str, Any]:
    net = stage.net
    details = (
        LOCATOR_RECIPE
        if stage.name == "locator"
        else {**SEGMENTER_RECIPE, "crop_size": args.crop_size}
    )
    return {
        "name": name,
        "version": VERSION,
        "task": task,
        "architecture": {
            "class": "services.analysis.engine.nets.VesselUNet",
            "in_channels": 3,
            "widths": list(net.widths),
            "classes": net.head.out_channels,
            "dtype": "float16",
            "input_side": side,
        },
        "training_data": data,
        "recipe": {
            **details,
            "steps": stage.steps,
            "batch": args.batch,
            "lr": args.lr,
            "schedule": "AdamW, wd 1e-4, 5 % warm-up, cosine to 2 %",
            "bf16_autocast": args.bf16,
            "seed": args.seed,
            "threads": args.threads,
        },
        "training_wall_s": round(stage.wall_s, 1),
        "final_loss": float(np.mean(stage.losses[-50:])),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def save_models(
    out: Path,
    locator: Stage,
    segmenter: Stage,
    args: argparse.Namespace,
    train_ids: list[str],
    metrics: dict[str, Any],
) -> None:
    idrid = [f"IDRiD_{n:02d}" for n in range(1, 21)]
    for stage, name, task, data, side in (
        (
            locator,
            "disc_locator",
            disc.LOCATOR_TASK,
            {"Drishti-GS1/Training": train_ids, "IDRiD-seg (optic disc masks)": idrid},
            disc.LOCATOR_SIDE,
        ),
        (
            segmenter,
            "disc_cup",
            disc.SEGMENTER_TASK,
            {"Drishti-GS1/Training (majority of 4 experts)": train_ids},
            args.crop_size,
        ),
    ):
        state = {
            k: v.half() if v.is_floating_point() else v for k, v in stage.net.state_dict().items()
        }
        meta = {**manifest(name, task, stage, args, data, side), "metrics": metrics}
        save_with_manifest(state, out / f"{name}.safetensors", meta)


def cv_metrics(cv_dir: Path) -> dict[str, Any]:
    """Per-fold and mean CV metrics from the fold runs' metrics.json files."""
    per_fold = {}
    for path in sorted(cv_dir.glob("fold*/metrics.json")):
        per_fold[path.parent.name] = json.loads(path.read_text())["summary"]
    if not per_fold:
        return {"note": "no cross-validation results found"}
    keys = ("disc_dice", "cup_dice", "vcdr_mae")
    mean = {k: float(np.mean([f[k] for f in per_fold.values()])) for k in keys}
    # The fold runs' own recipes: the served models may have been trained differently.
    first = sorted(cv_dir.glob("fold*/"))[0]
    recipes = {
        name: json.loads((first / f"{name}.json").read_text())["recipe"]
        for name in ("disc_locator", "disc_cup")
        if (first / f"{name}.json").is_file()
    }
    return {
        "fold_recipes": recipes,
        "protocol": "Drishti-GS1 training set, 5 seeded folds by image id, full pipeline "
        "(locator -> crop -> segmenter) on the held-out 10, majority GT, vCDR vs experts' mean",
        "folds": per_fold,
        "mean_over_folds": mean,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.bf16 is None:
        args.bf16 = bf16_is_native(torch.device("cpu"))
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    cache = load_cache(args)
    train_ids, test_ids = split(cache, args.fold)
    rows = np.array([i for i, name in enumerate(cache["drishti_ids"]) if name in train_ids])
    locator = train_locator(args, cache, rows)
    segmenter = train_segmenter(args, cache, rows)
    metrics: dict[str, Any] = {}
    if test_ids:
        pipeline = DiscSegmenter.from_nets(locator.net, segmenter.net, args.bf16, args.crop_size)
        cases = [evaluate_case(pipeline, args.datasets, image_id) for image_id in test_ids]
        metrics = {
            "fold": args.fold,
            "test_ids": test_ids,
            "summary": summarize(cases),
            "cases": cases,
        }
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(json.dumps(metrics["summary"]), flush=True)
    save_models(args.out, locator, segmenter, args, train_ids, metrics.get("summary", {}))
    if args.export:
        save_models(
            disc.WEIGHTS_DIR,
            locator,
            segmenter,
            args,
            train_ids,
            {"cross_validation": cv_metrics(args.cv_dir)},
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
