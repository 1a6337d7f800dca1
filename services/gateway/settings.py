"""Settings of the gateway (environment variables prefixed RETINAL_GATEWAY_)."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.config import MIB


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RETINAL_GATEWAY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    analysis_addr: str = "127.0.0.1:50051"
    lesion_addr: str = "127.0.0.1:50052"
    language_addr: str = "127.0.0.1:50053"
    # Deadlines (seconds) on every backend call.
    health_deadline_s: float = Field(default=2.0, gt=0)
    analysis_deadline_s: float = Field(default=60.0, gt=0)
    lesion_deadline_s: float = Field(default=60.0, gt=0)
    language_deadline_s: float = Field(default=120.0, gt=0)
    max_upload_mb: int = Field(default=50, ge=1)
    max_message_mb: int = Field(default=64, ge=1)
    log_level: str = "INFO"
    # Where analyses are kept: a SQLite file, or postgresql+psycopg://user@host/db.
    results_url: str = "sqlite:///var/gateway/results.db"
    # Tenants' API keys as SHA-256 digests (see services/gateway/tenants.py); none: open.
    api_keys: str = ""
    api_keys_file: Path | None = None
    # Per-tenant rate limits ("N/second|minute|hour"); counters in memory or in Redis.
    rate_limit_analyses: str = "120/minute"
    rate_limit_requests: str = "1200/minute"
    rate_limit_storage: str = "memory://"

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * MIB

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * MIB
