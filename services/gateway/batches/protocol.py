"""Response models of /v1/batches."""

import datetime as dt

from pydantic import BaseModel, Field

from services.gateway.store import BatchRecord, BatchState, ImageState


class BatchOptions(BaseModel):
    pixel_size_um: float | None = Field(default=None, description="Micrometres per pixel")
    overlays: list[str] = Field(default_factory=list, description="Overlay layers rendered")


class BatchCounts(BaseModel):
    total: int
    pending: int = Field(description="queued + running")
    queued: int
    running: int
    done: int
    failed: int = Field(description="refused by ingestion or failed in a backend")
    skipped: int = Field(description="archive members refused before storage")
    cancelled: int


class ImageErrorModel(BaseModel):
    position: int = Field(description="Order of the file in the upload (archive members in turn)")
    name: str = Field(description="The file or archive member name as uploaded")
    state: ImageState
    code: str = Field(description="An ingestion code, a gRPC code or an archive refusal")
    detail: str


class BatchStatus(BaseModel):
    id: str = Field(description="Use it with GET /v1/batches/{id} and its results")
    state: BatchState
    created_at: dt.datetime
    cancelled_at: dt.datetime | None = None
    options: BatchOptions
    counts: BatchCounts
    errors: list[ImageErrorModel] = Field(description="Every failed or skipped image")
    results: dict[str, str] = Field(description="Format -> URL of the results table")

    @classmethod
    def of(cls, record: BatchRecord) -> "BatchStatus":
        counts = {state.value: n for state, n in record.counts.items()}
        return cls(
            id=record.id,
            state=record.state,
            created_at=record.created_at,
            cancelled_at=record.cancelled_at,
            options=BatchOptions.model_validate(record.options),
            counts=BatchCounts(
                total=sum(counts.values()),
                pending=counts["queued"] + counts["running"],
                **counts,
            ),
            errors=[
                ImageErrorModel(
                    position=e.position, name=e.name, state=e.state, code=e.code, detail=e.detail
                )
                for e in record.errors
            ],
            results={fmt: f"/v1/batches/{record.id}/results.{fmt}" for fmt in ("jsonl", "csv")},
        )
