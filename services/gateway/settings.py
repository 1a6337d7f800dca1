"""Settings of the gateway (environment variables prefixed RETINAL_GATEWAY_)."""

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.config import MIB


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RETINAL_GATEWAY_", extra="ignore", populate_by_name=True
    )

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
    rate_limit_chats: str = "60/minute"  # answers of the language model (/v1/chat...)
    rate_limit_storage: str = "memory://"
    # Batches (the queue is the worker's: REDIS_URL, RETINAL_WORKER_EMBEDDED_BROKER_DIR).
    # Each batch's files are kept under batch_dir/<batch id>/, which the workers read too.
    batch_dir: Path = Field(
        default=Path("var/batches"),
        validation_alias=AliasChoices("RETINAL_GATEWAY_BATCH_DIR", "RETINAL_BATCH_DIR"),
    )
    batch_max_upload_mb: int = Field(default=4096, ge=1)  # all files of one request
    batch_max_images: int = Field(default=10_000, ge=1)
    batch_max_total_mb: int = Field(default=8192, ge=1)  # a zip's members, uncompressed
    batch_max_compression_ratio: float = Field(default=100.0, gt=1)  # per zip member
    # Seconds between passes of the reconciler that sends the tasks a broker lost, and how
    # long a batch image may wait unsent (its sender failed), or unclaimed once the queue is
    # empty (its worker died holding the task), before it is sent again.
    batch_reconcile_interval_s: float = Field(default=30.0, gt=0)
    batch_unsent_grace_s: float = Field(default=60.0, ge=0)

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * MIB

    @property
    def chat_max_body_bytes(self) -> int:
        """A chat request's JSON: an upload's worth of base64 image, and 1 MiB of messages."""
        return self.max_upload_bytes * 4 // 3 + MIB

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * MIB

    @property
    def batch_max_upload_bytes(self) -> int:
        return self.batch_max_upload_mb * MIB

    @property
    def batch_max_total_bytes(self) -> int:
        return self.batch_max_total_mb * MIB
