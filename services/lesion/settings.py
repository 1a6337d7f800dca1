"""Settings of the lesion service (environment variables prefixed RETINAL_LESION_)."""

from pydantic_settings import SettingsConfigDict

from shared.config import GrpcServiceSettings


class LesionSettings(GrpcServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RETINAL_LESION_", extra="ignore")

    port: int = 50052
