"""Settings common to the gRPC services, read from environment variables (pydantic-settings)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


class GrpcServiceSettings(BaseSettings):
    """What every gRPC service needs; each service subclasses it with its own env prefix."""

    model_config = SettingsConfigDict(extra="ignore")

    host: str = "127.0.0.1"
    port: int
    # A 4000x3000 RGB image is 36 MB of raw pixels: leave room for it and its findings.
    max_message_mb: int = Field(default=64, ge=1, le=1024)
    max_workers: int = Field(default=4, ge=1, le=64)
    # Seconds given to in-flight calls after SIGTERM before the server stops hard.
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    log_level: str = "INFO"
    # Prometheus /metrics on this port (same host); 0 turns it off.
    metrics_port: int = Field(ge=0, le=65535)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * MIB
