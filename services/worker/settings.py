"""Settings of the batch worker (RETINAL_WORKER_*; the broker from REDIS_URL)."""

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RETINAL_WORKER_", extra="ignore", populate_by_name=True
    )

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("REDIS_URL", "RETINAL_WORKER_REDIS_URL"),
    )
    # Used when no Redis answers: a broker on the local filesystem (one machine only).
    embedded_broker_dir: Path = Path("var/queue")
    analysis_addr: str = "127.0.0.1:50051"
    lesion_addr: str = "127.0.0.1:50052"
    analysis_deadline_s: float = Field(default=120.0, gt=0)
    lesion_deadline_s: float = Field(default=120.0, gt=0)
    max_message_mb: int = Field(default=64, ge=1)
    concurrency: int = Field(default=1, ge=1, le=64)
    max_retries: int = Field(default=5, ge=0)
    # Batches: the gateway's results store and batch files (the same database and folder).
    results_url: str = Field(
        default="sqlite:///var/gateway/results.db",
        validation_alias=AliasChoices("RETINAL_WORKER_RESULTS_URL", "RETINAL_GATEWAY_RESULTS_URL"),
    )
    batch_dir: Path = Field(
        default=Path("var/batches"),
        validation_alias=AliasChoices("RETINAL_WORKER_BATCH_DIR", "RETINAL_BATCH_DIR"),
    )
    # How long a claimed batch image is held: past it, the gateway's reconciler takes the
    # worker for dead and queues the image again. Longer than any one analysis.
    task_lease_s: float = Field(default=600.0, gt=0)
    # Claims of one batch image (retries included) before it fails as `too_many_attempts`:
    # an image that kills every worker that takes it must not loop forever.
    max_attempts: int = Field(default=10, ge=1)
    log_level: str = "INFO"
    # Prometheus /metrics of the worker's tasks (services/worker/observability.py); 0: none.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9454, ge=0, le=65535)
