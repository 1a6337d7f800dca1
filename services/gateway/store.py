"""The durable results store: analyses (findings and overlay PNGs) and batches, per tenant.

One SQLAlchemy Core schema; the URL picks the database: a SQLite file by default
(`sqlite:///var/gateway/results.db`), PostgreSQL with `postgresql+psycopg://...`. Every read
takes the tenant, so another tenant's id is simply not found. An analysis is also found by
its cache key (image content hash, options and model versions), unique per tenant: the same
image analysed twice by the same models is one stored result. Beside each analysis is its
chat image: the field-of-view crop, downscaled, as PNG, which the assistant (/v1/chat) is
shown with the findings (the upload itself is not kept).

A batch is a row in `batches` and one row per input file in `batch_images`, whose `state`
is the truth the queue only carries out (see ImageState): a message the broker loses is sent
again by the reconciler (services/gateway/batches/queue.py), and a redelivered message finds
its image already claimed or finished. Every state change is one conditional UPDATE, so
concurrent workers and reconcilers never move an image twice.

Calls are blocking (the gateway runs them in a thread); each opens its own short transaction.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    create_engine,
    event,
    func,
    insert,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError

from shared.findings import Findings

metadata = MetaData()

analyses = Table(
    "analyses",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("tenant", String(64), nullable=False, index=True),
    Column("cache_key", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("findings", Text, nullable=False),  # the findings document, JSON
    UniqueConstraint("tenant", "cache_key", name="uq_analyses_tenant_cache_key"),
)

overlays = Table(
    "overlays",
    metadata,
    Column(
        "analysis_id",
        String(36),
        ForeignKey("analyses.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("layer", String(32), primary_key=True),
    Column("png", LargeBinary, nullable=False),
)

# One per analysis: what the language model sees of the photograph (see chat_image_png).
chat_images = Table(
    "chat_images",
    metadata,
    Column(
        "analysis_id",
        String(36),
        ForeignKey("analyses.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("png", LargeBinary, nullable=False),
)


class ImageState(StrEnum):
    """Where one input file of a batch is. queued -> running -> done | failed; queued ->
    cancelled; skipped from the start. A running image whose lease ends (its worker died)
    goes back to queued."""

    QUEUED = "queued"  # stored, its task sent (or about to be)
    RUNNING = "running"  # a worker claimed it and holds a lease
    DONE = "done"  # analysed: `analysis_id` names the stored analysis
    FAILED = "failed"  # looked at and refused (ingestion code) or a backend error
    SKIPPED = "skipped"  # an archive member refused before storage (unsafe, bomb, ...)
    CANCELLED = "cancelled"  # the batch was cancelled before a worker claimed it


FINAL_STATES = (ImageState.DONE, ImageState.FAILED, ImageState.SKIPPED, ImageState.CANCELLED)
PENDING_STATES = (ImageState.QUEUED, ImageState.RUNNING)


class BatchState(StrEnum):
    """A batch's state, derived from its images' states (never stored, never stale)."""

    ACCEPTED = "accepted"  # stored and queued; no worker has claimed an image yet
    RUNNING = "running"  # some images are claimed or finished, some still pending
    COMPLETED = "completed"  # every image done
    COMPLETED_WITH_ERRORS = "completed_with_errors"  # nothing pending, some failed or skipped
    CANCELLED = "cancelled"  # cancelled: what had not started never will


batches = Table(
    "batches",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("tenant", String(64), nullable=False, index=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("options", Text, nullable=False),  # JSON: pixel_size_um, overlays
    Column("cancelled_at", DateTime(timezone=True)),
)

batch_images = Table(
    "batch_images",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("batch_id", String(36), ForeignKey("batches.id", ondelete="CASCADE"), nullable=False),
    Column("position", Integer, nullable=False),  # order in the upload; names the stored file
    Column("name", Text, nullable=False),  # as uploaded: the tenant's data, never logged
    Column("content_sha256", String(64)),
    Column("state", String(16), nullable=False),
    Column("error_code", String(64)),
    Column("error_detail", Text),
    Column("analysis_id", String(36), ForeignKey("analyses.id")),
    Column("attempts", Integer, nullable=False),  # claims by workers
    # The broker epoch its task was last sent under (None: not sent yet), and until when a
    # worker's claim (or a retry's wait) holds it.
    Column("epoch", String(64)),
    Column("lease_until", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("batch_id", "position", name="uq_batch_images_position"),
    Index("ix_batch_images_state", "state"),
)


@dataclass(frozen=True)
class StoredAnalysis:
    id: str
    created_at: dt.datetime
    findings: Findings
    overlay_layers: tuple[str, ...]
    has_chat_image: bool = False


@dataclass(frozen=True)
class NewImage:
    """One input of a new batch: stored and to be queued, or refused at admission."""

    position: int
    name: str
    state: ImageState
    content_sha256: str | None = None
    error_code: str | None = None
    error_detail: str | None = None


@dataclass(frozen=True)
class ImageError:
    position: int
    name: str
    state: ImageState
    code: str
    detail: str


@dataclass(frozen=True)
class BatchRecord:
    id: str
    created_at: dt.datetime
    options: dict[str, Any]
    cancelled_at: dt.datetime | None
    counts: dict[ImageState, int]
    claims: int  # worker claims over all images (0: nothing started)
    errors: list[ImageError] = field(default_factory=list)

    @property
    def state(self) -> BatchState:
        if self.cancelled_at is not None:
            return BatchState.CANCELLED
        if any(self.counts[s] for s in PENDING_STATES):
            return BatchState.RUNNING if self.claims else BatchState.ACCEPTED
        if self.counts[ImageState.FAILED] or self.counts[ImageState.SKIPPED]:
            return BatchState.COMPLETED_WITH_ERRORS
        return BatchState.COMPLETED


@dataclass(frozen=True)
class ImageResult:
    """One row of a batch's results, with the findings of a done image."""

    position: int
    name: str
    state: ImageState
    content_sha256: str | None
    analysis_id: str | None
    error_code: str | None
    error_detail: str | None
    findings: Findings | None


@dataclass(frozen=True)
class ClaimedImage:
    """What a worker needs to analyse the image it claimed."""

    id: str
    batch_id: str
    tenant: str
    position: int
    options: dict[str, Any]
    attempts: int  # claims so far, this one included


@dataclass(frozen=True)
class LostImage:
    """An unfinished image whose task the broker no longer holds; its row as it was read."""

    id: str
    state: ImageState
    epoch: str | None
    lease_until: dt.datetime | None


def _utc(value: dt.datetime) -> dt.datetime:
    """SQLite keeps no zone; everything stored is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def connect(url: str) -> Engine:
    """An engine for `url`; a SQLite file's folder is created, and its writers wait."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _pragmas(connection, _record) -> None:  # type: ignore[no-untyped-def]
        cursor = connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")  # overlays go with their analysis
        cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
        cursor.close()

    return engine


class ResultsStore:
    def __init__(self, url: str) -> None:
        self.engine = connect(url)
        metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def reachable(self) -> bool:
        """The database answers a trivial query (for readiness)."""
        try:
            with self.engine.connect() as connection:
                connection.execute(select(1))
        except OperationalError:
            return False
        return True

    def save_analysis(
        self,
        tenant: str,
        cache_key: str,
        found: Findings,
        rendered: Mapping[str, bytes],
        chat_image: bytes | None = None,
    ) -> StoredAnalysis:
        """Store a new analysis (with its chat image PNG, when given); if the tenant already
        has this cache key, return that one."""
        analysis_id = str(uuid.uuid4())
        created = dt.datetime.now(dt.UTC)
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    insert(analyses).values(
                        id=analysis_id,
                        tenant=tenant,
                        cache_key=cache_key,
                        created_at=created,
                        findings=found.model_dump_json(exclude_none=True),
                    )
                )
                if rendered:
                    connection.execute(
                        insert(overlays),
                        [
                            {"analysis_id": analysis_id, "layer": layer, "png": png}
                            for layer, png in rendered.items()
                        ],
                    )
                if chat_image is not None:
                    connection.execute(
                        insert(chat_images).values(analysis_id=analysis_id, png=chat_image)
                    )
        except IntegrityError:  # a concurrent request stored the same result first
            existing = self.find_cached(tenant, cache_key)
            if existing is None:
                raise
            return existing
        return StoredAnalysis(analysis_id, created, found, tuple(rendered), chat_image is not None)

    def _load(self, condition: object) -> StoredAnalysis | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(analyses).where(condition)).first()  # type: ignore[arg-type]
            if row is None:
                return None
            layers = connection.scalars(
                select(overlays.c.layer)
                .where(overlays.c.analysis_id == row.id)
                .order_by(overlays.c.layer)
            ).all()
            has_chat_image = connection.scalar(
                select(func.count()).where(chat_images.c.analysis_id == row.id)
            )
        return StoredAnalysis(
            row.id,
            _utc(row.created_at),
            Findings.model_validate_json(row.findings),
            tuple(layers),
            bool(has_chat_image),
        )

    def get_analysis(self, tenant: str, analysis_id: str) -> StoredAnalysis | None:
        return self._load((analyses.c.id == analysis_id) & (analyses.c.tenant == tenant))

    def find_cached(self, tenant: str, cache_key: str) -> StoredAnalysis | None:
        return self._load((analyses.c.cache_key == cache_key) & (analyses.c.tenant == tenant))

    def get_overlay(self, tenant: str, analysis_id: str, layer: str) -> bytes | None:
        query = (
            select(overlays.c.png)
            .join(analyses, analyses.c.id == overlays.c.analysis_id)
            .where(
                (analyses.c.tenant == tenant)
                & (overlays.c.analysis_id == analysis_id)
                & (overlays.c.layer == layer)
            )
        )
        with self.engine.connect() as connection:
            return connection.scalar(query)

    def keep_chat_image(self, analysis_id: str, png: bytes) -> None:
        """Give an analysis stored without one its chat image (a concurrent writer may win)."""
        with contextlib.suppress(IntegrityError), self.engine.begin() as connection:
            connection.execute(insert(chat_images).values(analysis_id=analysis_id, png=png))

    def get_chat_image(self, tenant: str, analysis_id: str) -> bytes | None:
        query = (
            select(chat_images.c.png)
            .join(analyses, analyses.c.id == chat_images.c.analysis_id)
            .where((analyses.c.tenant == tenant) & (chat_images.c.analysis_id == analysis_id))
        )
        with self.engine.connect() as connection:
            return connection.scalar(query)

    # ---- batches -------------------------------------------------------------------------

    def create_batch(
        self, batch_id: str, tenant: str, options: Mapping[str, Any], images: Sequence[NewImage]
    ) -> list[str]:
        """Store a batch and its images; returns the ids of the queued ones, in order."""
        now = dt.datetime.now(dt.UTC)
        rows = [
            {
                "id": str(uuid.uuid4()),
                "batch_id": batch_id,
                "position": image.position,
                "name": image.name,
                "content_sha256": image.content_sha256,
                "state": image.state.value,
                "error_code": image.error_code,
                "error_detail": image.error_detail,
                "attempts": 0,
                "updated_at": now,
            }
            for image in images
        ]
        with self.engine.begin() as connection:
            connection.execute(
                insert(batches).values(
                    id=batch_id, tenant=tenant, created_at=now, options=json.dumps(options)
                )
            )
            if rows:
                connection.execute(insert(batch_images), rows)
        return [row["id"] for row in rows if row["state"] == ImageState.QUEUED]

    def get_batch(self, tenant: str, batch_id: str) -> BatchRecord | None:
        """The batch with its counts per image state and every failed or skipped image."""
        with self.engine.connect() as connection:
            row = connection.execute(
                select(batches).where((batches.c.id == batch_id) & (batches.c.tenant == tenant))
            ).first()
            if row is None:
                return None
            counts = dict.fromkeys(ImageState, 0)
            claims = 0
            for state, count, attempts in connection.execute(
                select(batch_images.c.state, func.count(), func.sum(batch_images.c.attempts))
                .where(batch_images.c.batch_id == batch_id)
                .group_by(batch_images.c.state)
            ):
                counts[ImageState(state)] = count
                claims += attempts or 0
            errors = [
                ImageError(e.position, e.name, ImageState(e.state), e.error_code, e.error_detail)
                for e in connection.execute(
                    select(batch_images)
                    .where(
                        (batch_images.c.batch_id == batch_id)
                        & batch_images.c.state.in_([ImageState.FAILED, ImageState.SKIPPED])
                    )
                    .order_by(batch_images.c.position)
                )
            ]
        cancelled = _utc(row.cancelled_at) if row.cancelled_at else None
        return BatchRecord(
            row.id, _utc(row.created_at), json.loads(row.options), cancelled, counts, claims, errors
        )

    def batch_results(self, batch_id: str) -> Iterator[ImageResult]:
        """Every image of a batch (the caller checked the tenant), in upload order, streamed."""
        query = (
            select(batch_images, analyses.c.findings)
            .outerjoin(analyses, analyses.c.id == batch_images.c.analysis_id)
            .where(batch_images.c.batch_id == batch_id)
            .order_by(batch_images.c.position)
            .execution_options(yield_per=100)
        )
        with self.engine.connect() as connection:
            for row in connection.execute(query):
                yield ImageResult(
                    row.position,
                    row.name,
                    ImageState(row.state),
                    row.content_sha256,
                    row.analysis_id,
                    row.error_code,
                    row.error_detail,
                    Findings.model_validate_json(row.findings) if row.findings else None,
                )

    def cancel_batch(self, tenant: str, batch_id: str) -> bool:
        """Cancel the images no worker has claimed; False when the tenant has no such batch."""
        now = dt.datetime.now(dt.UTC)
        with self.engine.begin() as connection:
            found = connection.execute(
                update(batches)
                .where((batches.c.id == batch_id) & (batches.c.tenant == tenant))
                .values(cancelled_at=func.coalesce(batches.c.cancelled_at, now))
            ).rowcount
            if not found:
                return False
            connection.execute(
                update(batch_images)
                .where(
                    (batch_images.c.batch_id == batch_id)
                    & (batch_images.c.state == ImageState.QUEUED)
                )
                .values(state=ImageState.CANCELLED, lease_until=None, updated_at=now)
            )
        return True

    def claim_image(self, image_id: str, lease_s: float) -> ClaimedImage | None:
        """Move a queued image to running for `lease_s` seconds; None when it is not queued
        (finished, cancelled, or claimed by another worker: a redelivered message)."""
        now = dt.datetime.now(dt.UTC)
        with self.engine.begin() as connection:
            claimed = connection.execute(
                update(batch_images)
                .where(
                    (batch_images.c.id == image_id) & (batch_images.c.state == ImageState.QUEUED)
                )
                .values(
                    state=ImageState.RUNNING,
                    attempts=batch_images.c.attempts + 1,
                    lease_until=now + dt.timedelta(seconds=lease_s),
                    updated_at=now,
                )
            ).rowcount
            if not claimed:
                return None
            row = connection.execute(
                select(
                    batch_images.c.batch_id,
                    batch_images.c.position,
                    batch_images.c.attempts,
                    batches.c.tenant,
                    batches.c.options,
                )
                .join(batches, batches.c.id == batch_images.c.batch_id)
                .where(batch_images.c.id == image_id)
            ).one()
        return ClaimedImage(
            image_id, row.batch_id, row.tenant, row.position, json.loads(row.options), row.attempts
        )

    def _settle(self, image_id: str, **values: Any) -> bool:
        """A running image's outcome; False when it was not running (another worker's)."""
        with self.engine.begin() as connection:
            return bool(
                connection.execute(
                    update(batch_images)
                    .where(
                        (batch_images.c.id == image_id)
                        & (batch_images.c.state == ImageState.RUNNING)
                    )
                    .values(updated_at=dt.datetime.now(dt.UTC), **{"lease_until": None, **values})
                ).rowcount
            )

    def finish_image(self, image_id: str, analysis_id: str) -> bool:
        return self._settle(image_id, state=ImageState.DONE, analysis_id=analysis_id)

    def fail_image(self, image_id: str, code: str, detail: str) -> bool:
        return self._settle(image_id, state=ImageState.FAILED, error_code=code, error_detail=detail)

    def release_image(self, image_id: str, lease_s: float) -> bool:
        """Back to queued while a retry waits; held for `lease_s` (then the reconciler may
        send it again, should the retry's message be lost with its worker)."""
        lease = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=lease_s)
        return self._settle(image_id, state=ImageState.QUEUED, lease_until=lease)

    def mark_sent(self, image_ids: Sequence[str], epoch: str) -> None:
        """Their tasks were sent while the broker had this epoch."""
        with self.engine.begin() as connection:
            for start in range(0, len(image_ids), 500):
                connection.execute(
                    update(batch_images)
                    .where(
                        batch_images.c.id.in_(image_ids[start : start + 500])
                        & (batch_images.c.state == ImageState.QUEUED)
                    )
                    .values(epoch=epoch)
                )

    def lost_images(
        self, epoch: str, unsent_grace_s: float, *, queue_empty: bool = False, limit: int = 1000
    ) -> list[LostImage]:
        """Unfinished images whose task is gone: sent under another broker epoch (the broker
        lost its queues), never sent for `unsent_grace_s` (the sender failed), whose lease
        ended (the worker holding it died), or, when the broker's queue is empty, still
        unclaimed `unsent_grace_s` after sending (a worker died after taking the task and
        before claiming the image: the broker would hold that task back until its visibility
        timeout, an hour)."""
        now = dt.datetime.now(dt.UTC)
        queued = batch_images.c.state == ImageState.QUEUED
        unleased = batch_images.c.lease_until.is_(None)
        waited = batch_images.c.updated_at < now - dt.timedelta(seconds=unsent_grace_s)
        lost = or_(
            and_(
                queued, unleased, batch_images.c.epoch.is_not(None), batch_images.c.epoch != epoch
            ),
            and_(
                queued, unleased, waited, true() if queue_empty else batch_images.c.epoch.is_(None)
            ),
            and_(batch_images.c.state.in_(PENDING_STATES), batch_images.c.lease_until < now),
        )
        query = (
            select(
                batch_images.c.id,
                batch_images.c.state,
                batch_images.c.epoch,
                batch_images.c.lease_until,
            )
            .join(batches, batches.c.id == batch_images.c.batch_id)
            .where(lost & batches.c.cancelled_at.is_(None))
            .order_by(batch_images.c.updated_at)
            .limit(limit)
        )
        with self.engine.connect() as connection:
            return [
                LostImage(row.id, ImageState(row.state), row.epoch, row.lease_until)
                for row in connection.execute(query)
            ]

    def requeue(self, lost: LostImage, epoch: str) -> bool:
        """Queue a lost image again under `epoch`, unless someone changed it since it was read
        (another reconciler, or its worker after all); True when this caller should send it."""
        unchanged = (
            (batch_images.c.id == lost.id)
            & (batch_images.c.state == lost.state)
            & (
                batch_images.c.epoch.is_(None)
                if lost.epoch is None
                else batch_images.c.epoch == lost.epoch
            )
            & (
                batch_images.c.lease_until.is_(None)
                if lost.lease_until is None
                else batch_images.c.lease_until == lost.lease_until
            )
        )
        with self.engine.begin() as connection:
            return bool(
                connection.execute(
                    update(batch_images)
                    .where(unchanged)
                    .values(
                        state=ImageState.QUEUED,
                        epoch=epoch,
                        lease_until=None,
                        updated_at=dt.datetime.now(dt.UTC),
                    )
                ).rowcount
            )

    def unsend(self, image_id: str) -> None:
        """Sending its task failed: leave it for the next reconciliation."""
        with self.engine.begin() as connection:
            connection.execute(
                update(batch_images)
                .where(
                    (batch_images.c.id == image_id) & (batch_images.c.state == ImageState.QUEUED)
                )
                .values(epoch=None)
            )

    def image_counts(self) -> dict[ImageState, int]:
        """Images of every batch per state (for metrics)."""
        counts = dict.fromkeys(ImageState, 0)
        with self.engine.connect() as connection:
            for state, count in connection.execute(
                select(batch_images.c.state, func.count()).group_by(batch_images.c.state)
            ):
                counts[ImageState(state)] = count
        return counts
