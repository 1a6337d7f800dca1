"""The shared network runtime: engine choice and the ONNX Runtime engine's outputs."""

from __future__ import annotations

import pytest
import torch

from services.analysis.engine.runtime import NetRunner
from services.analysis.engine.vessels import VesselSegmenter
from services.lesion.engine.detector import LesionDetector


@pytest.mark.parametrize("runner", [VesselSegmenter, LesionDetector], ids=["vessels", "lesions"])
def test_the_onnxruntime_engine_gives_pytorch_s_outputs(runner: type[NetRunner]) -> None:
    exported = runner.load(threads=1, precision="fp32", engine="onnxruntime")
    plain = runner.load(threads=1, precision="fp32", engine="torch")
    assert exported.session is not None and plain.session is None
    torch.manual_seed(0)
    # Another batch size and other sides than the export's example: the axes are dynamic.
    batch = torch.randn(3, plain.net.in_channels, 96, 160)
    torch.testing.assert_close(exported.forward(batch), plain.forward(batch), rtol=1e-4, atol=1e-4)


def test_the_engine_follows_the_precision() -> None:
    assert VesselSegmenter.load(threads=1, precision="fp32").session is not None
    # bf16 autocast is PyTorch's (forced here: on a CPU without native bf16 it is emulated).
    assert VesselSegmenter.load(threads=1, precision="bf16").session is None
    with pytest.raises(ValueError, match="fp32 on the CPU"):
        VesselSegmenter.load(threads=1, precision="bf16", engine="onnxruntime")
