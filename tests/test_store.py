"""The results store on SQLite and on PostgreSQL (127.0.0.1:5432; skipped when absent)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError

from services.gateway.store import ResultsStore
from shared import findings

POSTGRES_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@dataclass
class ScratchDatabase:
    """A throw-away PostgreSQL database, and the admin connection that made it."""

    admin: Engine
    name: str

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:5432/{self.name}"


@pytest.fixture
def postgres() -> Iterator[ScratchDatabase]:
    admin = create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    name = f"retinal_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f"CREATE DATABASE {name}"))
    except OperationalError as error:
        admin.dispose()
        pytest.skip(f"no PostgreSQL at 127.0.0.1:5432: {error.orig}")
    try:
        yield ScratchDatabase(admin, name)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'results.db'}"
    return request.getfixturevalue("postgres").url


def _findings(sha: str = "ab" * 32) -> findings.Findings:
    return findings.Findings(
        image=findings.ImageInfo(width=640, height=480, content_sha256=sha),
        quality=findings.Quality(grade=findings.QualityGrade.GOOD, reasons=["sharp"]),
    )


def test_an_analysis_is_stored_durably_with_its_overlays(store_url: str) -> None:
    store = ResultsStore(store_url)
    saved = store.save_analysis("clinic-a", "k1", _findings(), {"vessels": b"\x89PNG v"})
    store.close()
    reopened = ResultsStore(store_url)  # a new process would see the same
    loaded = reopened.get_analysis("clinic-a", saved.id)
    assert loaded is not None
    assert loaded.findings == _findings()
    assert loaded.overlay_layers == ("vessels",)
    assert loaded.created_at == saved.created_at
    assert reopened.get_overlay("clinic-a", saved.id, "vessels") == b"\x89PNG v"
    assert reopened.get_overlay("clinic-a", saved.id, "disc") is None
    reopened.close()


def test_another_tenant_finds_nothing(store_url: str) -> None:
    store = ResultsStore(store_url)
    saved = store.save_analysis("clinic-a", "k1", _findings(), {"vessels": b"png"})
    assert store.get_analysis("clinic-b", saved.id) is None
    assert store.get_overlay("clinic-b", saved.id, "vessels") is None
    assert store.find_cached("clinic-b", "k1") is None
    # The same image and models for another tenant is that tenant's own result.
    other = store.save_analysis("clinic-b", "k1", _findings(), {})
    assert other.id != saved.id
    store.close()


def test_one_result_per_tenant_and_cache_key(store_url: str) -> None:
    store = ResultsStore(store_url)
    first = store.save_analysis("clinic-a", "same", _findings("01" * 32), {})
    second = store.save_analysis("clinic-a", "same", _findings("02" * 32), {"disc": b"x"})
    assert second.id == first.id
    assert store.find_cached("clinic-a", "same").findings.image.content_sha256 == "01" * 32
    assert store.get_overlay("clinic-a", first.id, "disc") is None
    assert store.get_analysis("clinic-a", "no-such-id") is None
    store.close()


def test_the_gateway_answers_503_while_the_database_refuses_and_recovers_after(
    postgres: ScratchDatabase,
) -> None:
    from fastapi.testclient import TestClient

    from services.gateway.app import create_app
    from services.gateway.settings import GatewaySettings

    def refuse(refusing: bool) -> None:
        with postgres.admin.connect() as connection:
            allow = f"ALTER DATABASE {postgres.name} ALLOW_CONNECTIONS {not refusing}"
            connection.execute(text(allow))
            if refusing:  # and drop the gateway's pooled connections
                terminate = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                connection.execute(text(f"{terminate} WHERE datname = '{postgres.name}'"))

    with TestClient(create_app(GatewaySettings(results_url=postgres.url))) as client:
        assert client.get("/v1/analyses/nope").status_code == 404
        refuse(True)
        down = client.get("/v1/analyses/nope")
        assert down.status_code == 503, down.text
        assert down.json()["code"] == "store-unavailable"
        assert down.headers["Retry-After"]
        assert client.get("/readyz").json()["store"] == "unreachable"
        refuse(False)
        assert client.get("/v1/analyses/nope").status_code == 404  # no restart needed


# ---- batches ---------------------------------------------------------------------------------


def _new_batch(
    store: ResultsStore, tenant: str = "clinic-a", queued: int = 3
) -> tuple[str, list[str]]:
    from services.gateway.store import ImageState, NewImage

    batch_id = str(uuid.uuid4())
    images = [NewImage(i, f"eye-{i}.png", ImageState.QUEUED, f"{i:064x}") for i in range(queued)]
    images.append(
        NewImage(queued, "../evil.png", ImageState.SKIPPED, None, "unsafe_path", "leaves")
    )
    ids = store.create_batch(batch_id, tenant, {"pixel_size_um": 6.5, "overlays": []}, images)
    return batch_id, ids


def test_a_batch_moves_through_its_states_and_only_its_tenant_sees_it(store_url: str) -> None:
    from services.gateway.store import BatchState, ImageState

    store = ResultsStore(store_url)
    batch_id, ids = _new_batch(store)
    assert len(ids) == 3
    assert store.get_batch("clinic-b", batch_id) is None
    assert not store.cancel_batch("clinic-b", batch_id)
    record = store.get_batch("clinic-a", batch_id)
    assert record is not None and record.state == BatchState.ACCEPTED
    assert record.counts[ImageState.QUEUED] == 3 and record.counts[ImageState.SKIPPED] == 1
    assert [(e.name, e.code) for e in record.errors] == [("../evil.png", "unsafe_path")]

    claimed = store.claim_image(ids[0], lease_s=60)
    assert claimed is not None and claimed.tenant == "clinic-a" and claimed.position == 0
    assert claimed.options["pixel_size_um"] == 6.5 and claimed.attempts == 1
    assert store.claim_image(ids[0], lease_s=60) is None  # a redelivered message: no-op
    assert store.get_batch("clinic-a", batch_id).state == BatchState.RUNNING
    saved = store.save_analysis("clinic-a", "key-0", _findings(), {})
    assert store.finish_image(ids[0], saved.id)
    assert not store.finish_image(ids[0], saved.id)  # written once
    assert not store.fail_image(ids[0], "x", "y")  # a finished image stays finished

    assert store.claim_image(ids[1], lease_s=60) is not None
    assert store.fail_image(ids[1], "truncated", "the file ends early")
    assert store.cancel_batch("clinic-a", batch_id)
    record = store.get_batch("clinic-a", batch_id)
    assert record.state == BatchState.CANCELLED
    assert record.counts[ImageState.CANCELLED] == 1
    assert store.claim_image(ids[2], lease_s=60) is None  # cancelled before it started

    rows = list(store.batch_results(batch_id))
    assert [r.state for r in rows] == [
        ImageState.DONE,
        ImageState.FAILED,
        ImageState.CANCELLED,
        ImageState.SKIPPED,
    ]
    assert rows[0].findings == _findings() and rows[0].analysis_id == saved.id
    assert (rows[1].error_code, rows[1].findings) == ("truncated", None)
    store.close()


def test_a_batch_with_nothing_pending_is_completed_or_completed_with_errors(
    store_url: str,
) -> None:
    from services.gateway.store import BatchState

    store = ResultsStore(store_url)
    batch_id, ids = _new_batch(store, queued=1)
    assert store.claim_image(ids[0], lease_s=60) is not None
    assert store.finish_image(ids[0], store.save_analysis("clinic-a", "k", _findings(), {}).id)
    assert store.get_batch("clinic-a", batch_id).state == BatchState.COMPLETED_WITH_ERRORS
    clean = str(uuid.uuid4())
    store.create_batch(clean, "clinic-a", {}, [])
    assert store.get_batch("clinic-a", clean).state == BatchState.COMPLETED
    store.close()


def test_lost_images_are_found_and_requeued_once(store_url: str) -> None:
    from services.gateway.store import ImageState

    store = ResultsStore(store_url)
    _, ids = _new_batch(store, queued=3)
    # Never sent: lost only after the grace period.
    assert store.lost_images("epoch-1", unsent_grace_s=60) == []
    assert {lost.id for lost in store.lost_images("epoch-1", unsent_grace_s=0)} == set(ids)
    store.mark_sent(ids, "epoch-1")
    assert store.lost_images("epoch-1", unsent_grace_s=0) == []
    # The broker lost its data: every queued image of the old epoch is lost...
    lost = store.lost_images("epoch-2", unsent_grace_s=0)
    assert {image.id for image in lost} == set(ids)
    # ...and requeued by one reconciler only.
    assert store.requeue(lost[0], "epoch-2")
    assert not store.requeue(lost[0], "epoch-2")
    # A worker died holding an image: lost when its lease ends.
    assert store.claim_image(ids[1], lease_s=-1) is not None
    assert store.claim_image(ids[2], lease_s=60) is not None
    lost = store.lost_images("epoch-2", unsent_grace_s=0)
    assert [(image.id, image.state) for image in lost] == [(ids[1], ImageState.RUNNING)]
    assert store.requeue(lost[0], "epoch-2")
    assert store.claim_image(ids[1], lease_s=60).attempts == 2
    assert store.lost_images("epoch-2", unsent_grace_s=0) == []
    store.close()


def test_a_task_taken_by_a_worker_that_died_before_claiming_is_lost_once_the_queue_is_empty(
    store_url: str,
) -> None:
    store = ResultsStore(store_url)
    _, ids = _new_batch(store, queued=2)
    store.mark_sent(ids, "epoch-1")
    assert store.claim_image(ids[1], lease_s=60) is not None  # a live worker holds this one
    # While tasks wait in the queue, an unclaimed image may just be waiting its turn.
    assert store.lost_images("epoch-1", unsent_grace_s=0) == []
    # Queue empty: still unclaimed after the grace period means its task went with a worker.
    assert store.lost_images("epoch-1", unsent_grace_s=60, queue_empty=True) == []
    lost = store.lost_images("epoch-1", unsent_grace_s=0, queue_empty=True)
    assert [image.id for image in lost] == [ids[0]]
    assert store.requeue(lost[0], "epoch-1")
    store.close()
