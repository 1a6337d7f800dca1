"""Settings of the lesion service (environment variables prefixed RETINAL_LESION_)."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.analysis.engine.runtime import Precision
from services.lesion.engine.detection import DEFAULT_MAX_PER_TYPE
from services.lesion.engine.detector import DEFAULT_WEIGHTS, SINGLE_PASS
from shared.config import GrpcServiceSettings


class LesionSettings(GrpcServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RETINAL_LESION_", extra="ignore")

    port: int = 50052
    metrics_port: int = 9452
    weights: Path = DEFAULT_WEIGHTS
    # Images processed at once; each detection already uses every core through PyTorch.
    concurrent_detections: int = Field(default=1, ge=1, le=16)
    # Lesions listed per type (the most confident); counts and areas still cover all of them.
    max_lesions_per_type: int = Field(default=DEFAULT_MAX_PER_TYPE, ge=1, le=10_000)
    # One network pass on the working grid for every type instead of the manifest's test-time
    # grids: about a quarter of the network time for a lower held-out AUPR (README, lesion
    # speed), for CPUs too slow for the grids.
    single_pass: bool = False
    # The network's precision; auto: bf16 where the CPU has it natively (or on CUDA), else the
    # committed int8 model in ONNX Runtime (README, lesion speed); fp32 to rule int8 out.
    precision: Precision = "auto"

    @property
    def test_time_scales(self) -> tuple[float, ...] | None:
        """What LesionDetector.load takes: one pass, or None for the manifest's grids."""
        return SINGLE_PASS if self.single_pass else None
