"""Quantise a served network to int8 for CPUs without native bf16.

    python -m training.quantise lesion     # services/lesion/weights/lesion-unet.int8.onnx
    python -m training.quantise vessel     # services/analysis/weights/vessel-av-unet.int8.onnx
                                           # (not shipped: it cost DRIVE AUC 0.0002; README)

ONNX Runtime's static quantisation, QDQ format: weights int8 per output channel, activations
uint8 per tensor with ranges calibrated (min/max) on the inputs the service itself gives the
network for training photographs. Those are recorded at `NetRunner.forward` while the fp32
runner processes them, so the calibration sees every test-time grid and tile the service runs,
preprocessed exactly as served. The weights use 7 of their 8 bits (`reduce_range`): without
VNNI, x86's u8 x s8 multiply-add saturates at full range.

The file goes beside the weights and into their manifest (`int8`: its sha256, the sha256 of
the weights it came from, the calibration photographs). `NetRunner` runs it where precision
"auto" finds no native bf16; bench/lesions.py and bench/vessels.py measure its accuracy
against fp32.
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from services.analysis.engine.model_files import save_quantised
from services.analysis.engine.nets import VesselUNet
from services.analysis.engine.runtime import NetRunner, onnx_model
from services.analysis.engine.vessels import VesselSegmenter
from services.lesion.engine.detector import LesionDetector
from training.lesions import data as lesion_data
from training.recording import shown
from training.segmentation import datasets

CALIBRATION_CROP = 384  # px side of the window kept from each recorded tile (bounds memory)
LESION_PHOTOGRAPHS = 5  # IDRiD-seg training photographs, each 18 tiles over the four grids
VESSEL_PHOTOGRAPHS = 20  # DRIVE training photographs, one 576-px pass each


@contextmanager
def recording(runner: NetRunner, crop: int, seed: int = 0) -> Iterator[list[np.ndarray]]:
    """Collects, while open, the first input of every batch `runner` runs: a random window of
    at most `crop` px a side (a multiple of the network's), as float32 1 x C x h x w."""
    recorded: list[np.ndarray] = []
    rng = np.random.default_rng(seed)
    side = crop - crop % runner.net.multiple
    forward = runner.forward

    def recorded_forward(batch: torch.Tensor) -> torch.Tensor:
        height, width = batch.shape[2:]
        y = int(rng.integers(0, max(1, height - side + 1)))
        x = int(rng.integers(0, max(1, width - side + 1)))
        window = batch[:1, :, y : y + side, x : x + side]
        recorded.append(np.ascontiguousarray(window.float().numpy()))
        return forward(batch)

    runner.forward = recorded_forward  # type: ignore[method-assign]
    try:
        yield recorded
    finally:
        del runner.forward


class _Inputs(CalibrationDataReader):
    def __init__(self, inputs: Sequence[np.ndarray]) -> None:
        self._inputs = iter(inputs)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._inputs, None)
        return None if batch is None else {"input": batch}


def int8_model(net: VesselUNet, calibration: Sequence[np.ndarray]) -> bytes:
    """`net` (eval mode, batch norms folded) as a QDQ int8 ONNX model calibrated on
    `calibration` (float32 1 x C x h x w network inputs)."""
    if not calibration:
        raise ValueError("int8 calibration needs at least one network input")
    with tempfile.TemporaryDirectory() as folder:
        exported, prepared, quantised = (Path(folder) / n for n in ("f.onnx", "p.onnx", "q.onnx"))
        exported.write_bytes(onnx_model(net))
        quant_pre_process(str(exported), str(prepared))  # shape inference, graph clean-up
        quantize_static(
            str(prepared),
            str(quantised),
            _Inputs(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        return quantised.read_bytes()


def calibrated(
    runner: NetRunner, run: Callable[[np.ndarray], object], photographs: Sequence[np.ndarray]
) -> bytes:
    """`runner`'s network in int8, calibrated on what `run` feeds it for `photographs`."""
    with recording(runner, CALIBRATION_CROP) as inputs:
        for rgb in photographs:
            run(rgb)
    return int8_model(runner.net, inputs)


def evenly_spread(image_ids: Sequence[str], count: int) -> list[str]:
    """`count` of `image_ids`, evenly spread over them."""
    picks = np.linspace(0, len(image_ids) - 1, num=min(count, len(image_ids)))
    return [image_ids[round(i)] for i in picks]


def lesion_int8(detector: LesionDetector, root: Path) -> tuple[bytes, list[str]]:
    """`detector`'s network in int8, calibrated through its own grids on LESION_PHOTOGRAPHS
    of the IDRiD-seg photographs it was trained on (its manifest's), and their ids."""
    chosen = evenly_spread(detector.manifest["training_data"]["IDRiD-seg"], LESION_PHOTOGRAPHS)
    photographs = [lesion_data.load_full(i, root)[0] for i in chosen]
    return calibrated(detector, detector.predict, photographs), chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=("lesion", "vessel"))
    parser.add_argument("--weights", type=Path, help="default: the served model's")
    parser.add_argument("--data-root", type=Path, default=lesion_data.DEFAULT_ROOT)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    details: dict[str, Any]
    if args.task == "lesion":
        detector = LesionDetector.load(args.weights, precision="fp32", threads=args.threads)
        model, chosen = lesion_int8(detector, args.data_root)
        details = {"calibration": {"IDRiD-seg": chosen}}
        weights = args.weights or LesionDetector.DEFAULT_WEIGHTS
    else:
        segmenter = VesselSegmenter.load(args.weights, precision="fp32", threads=args.threads)
        samples = datasets.drive(args.data_root, "training")[:VESSEL_PHOTOGRAPHS]
        photographs = [datasets.read_rgb(s) for s in samples]
        model = calibrated(segmenter, segmenter.predict, photographs)
        details = {"calibration": {"DRIVE training": [s.image_id for s in samples]}}
        weights = args.weights or VesselSegmenter.DEFAULT_WEIGHTS
    details |= {
        "method": "onnxruntime quantize_static, QDQ, per-channel int8 weights (reduce_range), "
        f"uint8 activations, min/max calibration on {CALIBRATION_CROP}-px windows of the "
        "served inputs",
        "onnxruntime": onnxruntime.__version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "command": f"python -m training.quantise {args.task}"
        + (f" --weights {shown(args.weights)}" if args.weights else ""),
    }
    manifest = save_quantised(weights, model, details)
    print(f"{shown(weights)}: int8 model {manifest['int8']['file']} ({len(model)} bytes)")


if __name__ == "__main__":
    main()
