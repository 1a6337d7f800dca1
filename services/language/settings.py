"""Settings of the language service (environment variables prefixed RETINAL_LANGUAGE_)."""

from pydantic_settings import SettingsConfigDict

from shared.config import GrpcServiceSettings


class LanguageSettings(GrpcServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RETINAL_LANGUAGE_", extra="ignore")

    port: int = 50053
    metrics_port: int = 9453
