"""A verified U-Net on its device, run in the precision and engine the hardware does fastest.

Shared by the vessel segmenter and the lesion detector (the lesion service imports it): both
load a `VesselUNet` from committed safetensors + manifest, refuse a file whose sha256 or task
does not match, and run under bf16 autocast with channels-last memory where the CPU has
native bf16 (AVX512-BF16 / AMX) or on CUDA. Elsewhere, on the CPU, ONNX Runtime runs it:
- int8, where the manifest names a quantised model beside the weights (`<name>.int8.onnx`,
  written by `python -m training.quantise`), verified like the weights;
- else fp32, the network exported to ONNX in memory when it loads, which did a 1024-px lesion
  tile in 0.75 s against PyTorch's 1.24 s on a 2-core AVX2 machine (the same outputs to 1e-4).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import ClassVar, Literal, Self

import onnxruntime
import torch

from services.analysis.engine.model_files import ModelFiles, load_verified, quantised_model
from services.analysis.engine.nets import VesselUNet, fold_batch_norm

# "auto": bf16 where native, else int8 on the CPU when the model has a quantised file, else fp32
Precision = Literal["auto", "fp32", "bf16", "int8"]
# "auto": ONNX Runtime for fp32 and int8 on the CPU, PyTorch otherwise (bf16 autocast, CUDA)
Engine = Literal["auto", "torch", "onnxruntime"]


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic (else bf16 autocast is emulated and slower than fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_is_native(device: torch.device) -> bool:
    """Whether bf16 autocast pays off on `device`: CUDA, or a CPU with native bf16. Where it is
    emulated (an AVX2-only CPU), a training step under it took 8 times as long as in fp32."""
    return device.type == "cuda" or cpu_has_bf16()


def resolved_precision(precision: Precision, device: torch.device, has_int8: bool) -> Precision:
    """What "auto" means on `device`: bf16 where native, else int8 on the CPU when a quantised
    model exists, else fp32; any other choice stands."""
    if precision != "auto":
        return precision
    if bf16_is_native(device):
        return "bf16"
    return "int8" if has_int8 and device.type == "cpu" else "fp32"


def pick_device(name: str = "auto") -> torch.device:
    """`name` ("cpu", "cuda"), or for "auto" CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def onnx_model(net: VesselUNet) -> bytes:
    """`net` (in eval mode) exported to ONNX: any batch size and any input sides that are
    multiples of `net.multiple`."""
    side = net.multiple
    example = torch.zeros(1, net.in_channels, side, side)
    axes = {0: "batch", 2: "height", 3: "width"}
    exported = io.BytesIO()
    # The TorchScript exporter, deprecated: the dynamo one took 17 s here instead of 1.7 s and
    # its graph ran a tile in 1.17 s instead of 0.75 s.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net,
            (example,),
            exported,
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": axes, "logits": axes},
        )
    return exported.getvalue()


def onnx_session(model: bytes, threads: int) -> onnxruntime.InferenceSession:
    """A CPU session of `threads` threads for a serialised ONNX model."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def build_net(files: ModelFiles) -> VesselUNet:
    """The architecture named by the manifest, with its weights (stored fp16) in fp32."""
    architecture = files.manifest["architecture"]
    net = VesselUNet(
        in_channels=int(architecture["in_channels"]),
        widths=tuple(architecture["widths"]),
        classes=int(architecture["classes"]),
    )
    state = {
        key: value.float() if value.is_floating_point() else value
        for key, value in files.state.items()
    }
    net.load_state_dict(state)
    return net


class NetRunner:
    """Base of the loaded networks: device, precision, verified loading, one forward pass."""

    TASK: ClassVar[str]
    DEFAULT_WEIGHTS: ClassVar[Path]

    def __init__(
        self,
        net: VesselUNet,
        manifest: dict,
        device: torch.device | None = None,
        precision: Precision = "auto",
        engine: Engine = "auto",
        int8_model: bytes | None = None,
    ) -> None:
        """`int8_model`: the network quantised to int8 ONNX (training.quantise.int8_model), which
        precision "int8" needs and "auto" takes on a CPU without native bf16."""
        self.device = device or pick_device()
        self.manifest = manifest
        self.precision = resolved_precision(precision, self.device, int8_model is not None)
        on_cpu = self.device.type == "cpu"
        if self.precision == "int8" and (int8_model is None or not on_cpu or engine == "torch"):
            raise ValueError("int8 runs a quantised model in ONNX Runtime on the CPU only")
        if engine == "onnxruntime" and not (on_cpu and self.precision != "bf16"):
            raise ValueError("the onnxruntime engine runs fp32 or int8 on the CPU only")
        # Inference only from here: the batch norms go into the convs (fold_batch_norm).
        self.net = fold_batch_norm(net.to(self.device).eval())
        threads = torch.get_num_threads()
        self.session = None
        if self.precision == "int8" and int8_model is not None:
            self.session = onnx_session(int8_model, threads)
        elif engine == "onnxruntime" or (engine == "auto" and on_cpu and self.precision == "fp32"):
            self.session = onnx_session(onnx_model(self.net), threads)
        if on_cpu and self.session is None:
            self.net = self.net.to(memory_format=torch.channels_last)

    @classmethod
    def load(
        cls,
        weights: Path | None = None,
        *,
        device: torch.device | None = None,
        precision: Precision = "auto",
        engine: Engine = "auto",
        threads: int | None = None,
        int8_model: bytes | None = None,
        **options: object,
    ) -> Self:
        """Verify and load committed weights; raises ModelIntegrityError on a bad file.
        `int8_model`: a quantised model to run instead of the manifest's int8 file."""
        weights = weights or cls.DEFAULT_WEIGHTS
        files = load_verified(weights)
        if files.manifest["task"] != cls.TASK:
            task = files.manifest["task"]
            raise ValueError(f"{weights} holds a {task!r} model, not {cls.TASK!r}")
        torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
        device = device or pick_device()
        has_int8 = int8_model is not None or "int8" in files.manifest
        precision = resolved_precision(precision, device, has_int8)
        if int8_model is None and precision == "int8":
            int8_model = quantised_model(weights, files.manifest)
        return cls(
            build_net(files), files.manifest, device, precision, engine, int8_model, **options
        )

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def version(self) -> str:
        return f"{self.manifest['name']}@{self.manifest['version']}"

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """N x C x H x W input -> float32 logits on the CPU."""
        if self.session is not None:
            inputs = batch.float().contiguous().numpy()
            return torch.from_numpy(self.session.run(None, {"input": inputs})[0])
        batch = batch.to(self.device)
        if self.device.type == "cpu":
            batch = batch.contiguous(memory_format=torch.channels_last)
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16),
        ):
            return self.net(batch).float().cpu()
