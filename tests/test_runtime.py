"""The shared network runtime: engine and precision choice, the ONNX Runtime engine's outputs,
and the int8 models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from services.analysis.engine import runtime
from services.analysis.engine.model_files import (
    ModelIntegrityError,
    quantised_model,
    save_quantised,
)
from services.analysis.engine.runtime import NetRunner
from services.analysis.engine.vessels import VesselSegmenter
from services.lesion.engine.detector import CONTEXT_WEIGHTS, LesionDetector
from shared.synthetic import generate_fundus
from training.quantise import int8_model, recording


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
    with pytest.raises(ValueError, match="fp32 or int8 on the CPU"):
        VesselSegmenter.load(threads=1, precision="bf16", engine="onnxruntime")


# --- int8 (training/quantise.py, model_files.quantised_model) --------------------------------


def _copied(weights: Path, folder: Path, suffixes: tuple[str, ...]) -> Path:
    """The model files of `weights` with these suffixes, copied into `folder`; the copy's path."""
    for suffix in suffixes:
        source = weights.with_suffix(suffix)
        (folder / source.name).write_bytes(source.read_bytes())
    return folder / weights.name


def _lesion_files(folder: Path) -> Path:
    """A copy of the served lesion model's weights, manifest and int8 file in `folder`, beside
    its context model's weights and manifest."""
    _copied(CONTEXT_WEIGHTS, folder, (".safetensors", ".json"))
    return _copied(LesionDetector.DEFAULT_WEIGHTS, folder, (".safetensors", ".json", ".int8.onnx"))


def test_the_committed_int8_lesion_model_is_the_weights_quantised() -> None:
    weights = LesionDetector.DEFAULT_WEIGHTS
    manifest = json.loads(weights.with_suffix(".json").read_text())
    assert manifest["int8"]["source_sha256"] == manifest["sha256"]
    assert quantised_model(weights, manifest)  # raises on a mismatch
    # The vessel model has none: int8 cost DRIVE test AUC 0.0002 (README), so it runs fp32.
    vessels = json.loads(VesselSegmenter.DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    assert "int8" not in vessels


def test_int8_lesion_probabilities_stay_near_fp32_s() -> None:
    int8 = LesionDetector.load(threads=1, precision="int8")
    fp32 = LesionDetector.load(threads=1, precision="fp32")
    assert int8.precision == "int8" and int8.session is not None
    torch.manual_seed(0)
    batch = torch.randn(2, fp32.net.in_channels, 96, 160)  # the inputs are z-scores
    difference = (torch.sigmoid(int8.forward(batch)) - torch.sigmoid(fp32.forward(batch))).abs()
    assert difference.mean() < 0.01
    assert difference.max() < 0.25
    assert not torch.equal(int8.forward(batch), fp32.forward(batch))  # it is another model


def test_auto_takes_int8_only_on_a_cpu_without_native_bf16(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    assert LesionDetector.load(threads=1).precision == "int8"
    weights = _lesion_files(tmp_path)
    manifest = json.loads(weights.with_suffix(".json").read_text())
    del manifest["int8"]
    weights.with_suffix(".json").write_text(json.dumps(manifest))
    assert LesionDetector.load(weights, threads=1).precision == "fp32"  # none to take
    with pytest.raises(ModelIntegrityError, match="names no int8 model"):
        LesionDetector.load(weights, threads=1, precision="int8")
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert LesionDetector.load(threads=1).precision == "bf16"


def test_int8_runs_in_onnxruntime_only() -> None:
    with pytest.raises(ValueError, match="int8 runs a quantised model in ONNX Runtime"):
        LesionDetector.load(threads=1, precision="int8", engine="torch")


def test_a_tampered_or_stale_int8_model_is_refused(tmp_path: Path) -> None:
    weights = _lesion_files(tmp_path)
    int8_file = weights.with_suffix(".int8.onnx")
    blob = bytearray(int8_file.read_bytes())
    blob[-1] ^= 0xFF
    int8_file.write_bytes(bytes(blob))
    with pytest.raises(ModelIntegrityError, match="checksum mismatch"):
        LesionDetector.load(weights, threads=1, precision="int8")
    _lesion_files(tmp_path)
    manifest_file = weights.with_suffix(".json")
    manifest = json.loads(manifest_file.read_text())
    manifest["int8"]["source_sha256"] = "0" * 64  # quantised from other weights
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ModelIntegrityError, match="quantised from other weights"):
        LesionDetector.load(weights, threads=1, precision="int8")


def test_quantisation_calibrates_on_the_inputs_the_runner_is_given(tmp_path: Path) -> None:
    segmenter = VesselSegmenter.load(threads=1, precision="fp32")
    photograph = generate_fundus(seed=3).rgb
    with recording(segmenter, crop=64) as inputs:
        segmenter.predict(photograph)
    assert "forward" not in vars(segmenter)  # the runner's own forward is back
    assert [window.shape for window in inputs] == [(1, 3, 64, 64)]  # the first of the batch
    weights = _copied(VesselSegmenter.DEFAULT_WEIGHTS, tmp_path, (".safetensors", ".json"))
    save_quantised(weights, int8_model(segmenter.net, inputs), {"calibration": "one photograph"})
    quantised = VesselSegmenter.load(weights, threads=1, precision="int8")
    assert quantised.manifest["int8"]["calibration"] == "one photograph"
    assert VesselSegmenter.load(weights, threads=1).precision in ("int8", "bf16")  # auto
    difference = np.abs(quantised.predict(photograph).vessel - segmenter.predict(photograph).vessel)
    assert difference.mean() < 0.01
