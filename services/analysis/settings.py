"""Settings of the analysis service (environment variables prefixed RETINAL_ANALYSIS_)."""

from pydantic_settings import SettingsConfigDict

from shared.config import GrpcServiceSettings


class AnalysisSettings(GrpcServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RETINAL_ANALYSIS_", extra="ignore")

    port: int = 50051
