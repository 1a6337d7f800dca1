"""Vessel segmentation and artery/vein classification (inference).

One pass of `VesselUNet` on the canonical grid (`preprocess.py`); the probabilities are mapped
back to the input's pixel grid. The canonical grid bounds the work: any photograph becomes one
576 x 576 pass, so no tiling is needed.

The network runs where runtime.NetRunner puts it: PyTorch with bf16 autocast and
channels-last memory on a CPU with native bf16 (AVX512-BF16 / AMX) or on CUDA; elsewhere on
the CPU, ONNX Runtime in fp32, or in int8 where a quantised model is written beside the weights
(`python -m training.quantise vessel`; none is committed, as int8 cost DRIVE test AUC 0.0002:
README). bench/vessels.py measures the served precision against fp32. On a 2-core AMD EPYC
with AVX512-BF16, a 576-px pass took 0.06 s in PyTorch bf16 (2 idle cores) against 0.17 s in
ONNX Runtime fp32 (1 core), with the same DRIVE test AUC and Dice to 4 decimals.

By default the logits are averaged over the image and its three mirror images (horizontal,
vertical, both), one batch of four: on DRIVE test this raised the AUC from 0.971 to 0.973 and
LES-AV / RITE A/V accuracy from 0.888 / 0.873 to 0.892 / 0.883, for about 0.3 s more per
image on one core (`bench/vessels.py` measures both). Adding the four transposed variants
gained 0.0004 AUC more at twice the cost, so they are not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.analysis.engine.nets import ARTERY, VEIN, VESSEL
from services.analysis.engine.preprocess import from_canonical, network_input
from services.analysis.engine.runtime import NetRunner
from shared.imaging.fov import FovEstimate, detect_field_of_view

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "vessel-av-unet.safetensors"
TASK = "vessel-segmentation+artery-vein"
NO_VESSEL, ARTERY_LABEL, VEIN_LABEL = 0, 1, 2
MIRRORS = ((), (3,), (2,), (2, 3))  # flipped dims of an N x C x H x W batch: none, x, y, both


@dataclass(frozen=True)
class VesselMaps:
    """Per-pixel results on the input image's grid."""

    vessel: np.ndarray  # float32 H x W, P(vessel), 0 outside the field of view
    artery: np.ndarray  # float32 H x W, P(artery | vessel): only meaningful on vessel pixels
    labels: np.ndarray  # uint8 H x W: 0 no vessel, 1 artery, 2 vein
    threshold: float  # vessel probability threshold behind `labels`


class VesselSegmenter(NetRunner):
    """A loaded vessel/AV network, ready to run on photographs."""

    TASK = TASK
    DEFAULT_WEIGHTS = DEFAULT_WEIGHTS

    def __init__(self, *args: Any, mirror_average: bool = True, **kwargs: Any) -> None:
        """NetRunner's arguments; `mirror_average`: average the four mirror images' logits."""
        super().__init__(*args, **kwargs)
        self.mirror_average = mirror_average
        self.threshold = float(self.manifest.get("threshold", 0.5))

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """N x 3 x S x S network input -> N x 3 x S x S float32 logits (mirror-averaged)."""
        mirrors = MIRRORS if self.mirror_average else ((),)
        outputs = self.forward(torch.cat([batch.flip(dims) for dims in mirrors]))
        chunks = outputs.chunk(len(mirrors))
        unflipped = [out.flip(dims) for out, dims in zip(chunks, mirrors, strict=True)]
        return torch.stack(unflipped).mean(0)

    def predict(self, image: np.ndarray, fov: FovEstimate | None = None) -> VesselMaps:
        """uint8 H x W x 3 RGB photograph (its FOV, if already known) -> vessel and A/V maps."""
        fov = fov or detect_field_of_view(image)
        inputs, grid = network_input(image, fov)
        logits = self.logits(inputs[None])[0].cpu()
        vessel = torch.sigmoid(logits[VESSEL]) * grid.fov_mask()
        artery = torch.sigmoid(logits[ARTERY] - logits[VEIN])  # 2-way softmax
        full = from_canonical(torch.stack([vessel, artery]), grid).numpy()
        on_vessel = full[0] >= self.threshold
        labels = np.where(full[1] >= 0.5, ARTERY_LABEL, VEIN_LABEL).astype(np.uint8)
        return VesselMaps(
            vessel=full[0],
            artery=full[1],
            labels=np.where(on_vessel, labels, NO_VESSEL).astype(np.uint8),
            threshold=self.threshold,
        )
