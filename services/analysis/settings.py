"""Settings of the analysis service (environment variables prefixed RETINAL_ANALYSIS_)."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.analysis.engine.runtime import Precision
from shared.config import GrpcServiceSettings


class AnalysisSettings(GrpcServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RETINAL_ANALYSIS_", extra="ignore")

    port: int = 50051
    metrics_port: int = 9451
    weights_dir: Path = Path(__file__).resolve().parent / "weights"
    # Images analysed at once; each analysis already uses every core through PyTorch.
    concurrent_analyses: int = Field(default=1, ge=1, le=16)
    # PyTorch threads (default: one per core). Set 1 when other busy processes share the
    # cores: oversubscribed OpenMP threads made a DRIVE image 10x slower here.
    torch_threads: int | None = Field(default=None, ge=1, le=256)
    # Average the vessel network over mirror images (+0.002 DRIVE AUC, +0.3 s per image on
    # one core; see services/analysis/engine/vessels.py). Off for the highest throughput.
    vessel_mirror_average: bool = True
    # The vessel network's precision; auto: bf16 where the CPU has it natively (or on CUDA),
    # else an int8 model in ONNX Runtime if one was written (none is committed), else fp32.
    vessel_precision: Precision = "auto"
