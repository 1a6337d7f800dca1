"""The durable results store: analyses (findings and overlay PNGs) per tenant.

One SQLAlchemy Core schema; the URL picks the database: a SQLite file by default
(`sqlite:///var/gateway/results.db`), PostgreSQL with `postgresql+psycopg://...`. Every read
takes the tenant, so another tenant's id is simply not found. An analysis is also found by
its cache key (image content hash, options and model versions), unique per tenant: the same
image analysed twice by the same models is one stored result.

Calls are blocking (the gateway runs them in a thread); each opens its own short transaction.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    insert,
    select,
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


@dataclass(frozen=True)
class StoredAnalysis:
    id: str
    created_at: dt.datetime
    findings: Findings
    overlay_layers: tuple[str, ...]


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
    ) -> StoredAnalysis:
        """Store a new analysis; if the tenant already has this cache key, return that one."""
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
        except IntegrityError:  # a concurrent request stored the same result first
            existing = self.find_cached(tenant, cache_key)
            if existing is None:
                raise
            return existing
        return StoredAnalysis(analysis_id, created, found, tuple(rendered))

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
        created = row.created_at
        if created.tzinfo is None:  # SQLite keeps no zone; everything stored is UTC
            created = created.replace(tzinfo=dt.UTC)
        return StoredAnalysis(
            row.id, created, Findings.model_validate_json(row.findings), tuple(layers)
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
