"""Batches through the gateway, Redis and a Celery worker (real processes, real gRPC)."""

from __future__ import annotations

import csv
import io
import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from shared.tables import CSV_COLUMNS
from tests.batching import KEYS, BatchStack, auth
from tests.conftest import fundus_png, wait_until
from tests.test_gateway import _is_problem

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def batches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatchStack]:
    running = BatchStack(tmp_path_factory.mktemp("batches"))
    try:
        running.start()
        yield running
    finally:
        running.stop()


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _bad_files() -> dict[str, tuple[bytes, str]]:
    """Five kinds of bad file, and the reason each is refused for."""
    return {
        "notes.txt": (b"not an image at all", "unsupported_format"),
        "empty.png": (b"", "empty"),
        "cut.png": (fundus_png(260)[:300], "truncated"),
        "tiny.png": (_png(np.full((40, 40, 3), 120, np.uint8)), "too_small"),
        "black.png": (_png(np.zeros((256, 256, 3), np.uint8)), "no_field_of_view"),
    }


def test_good_and_bad_files_end_completed_with_errors_with_reasons(batches: BatchStack) -> None:
    good = [(f"good-{i}.png", fundus_png(300 + i)) for i in range(3)]
    bad = _bad_files()
    batch_id = batches.submit(
        [*good, *((name, content) for name, (content, _) in bad.items())], overlays="vessels"
    )
    status = batches.wait_final(batch_id, 120)
    assert status["state"] == "completed_with_errors"
    counts = status["counts"]
    assert (counts["total"], counts["done"], counts["failed"], counts["pending"]) == (8, 3, 5, 0)
    assert {e["name"]: e["code"] for e in status["errors"]} == {
        name: code for name, (_, code) in bad.items()
    }
    assert all(e["detail"] for e in status["errors"])
    assert status["options"] == {"pixel_size_um": None, "overlays": ["vessels"]}

    lines = [json.loads(line) for line in batches.results(batch_id, "jsonl").text.splitlines()]
    assert [line["position"] for line in lines] == list(range(8))
    for line in lines[:3]:
        assert line["state"] == "done"
        assert line["findings"]["image"]["content_sha256"] == line["content_sha256"]
        # Each is a stored analysis of the tenant, with the overlay asked for.
        analysis = httpx.get(
            f"{batches.url}/v1/analyses/{line['analysis_id']}", headers=auth("clinic-a")
        ).json()
        assert set(analysis["overlays"]) == {"vessels"}
    assert {line["source"]: line["error"]["code"] for line in lines[3:]} == {
        name: code for name, (_, code) in bad.items()
    }

    reply = batches.results(batch_id, "csv")
    assert reply.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(reply.text)))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [row["source"] for row in rows] == [line["source"] for line in lines]
    assert [row["quality"] for row in rows[:3]] == [
        line["findings"]["quality"]["grade"] for line in lines[:3]
    ]
    assert [row["error"] for row in rows[3:]] == [code for _, code in bad.values()]

    # The worker's task id is the request id of its calls to the backends.
    worker = [json.loads(line) for line in batches.workers[0].log.splitlines() if "{" in line]
    done = [line for line in worker if line.get("message") == "batch image done"]
    assert len({line["request_id"] for line in done}) >= 3
    calls = [json.loads(line) for line in batches.stack.services["analysis"].log.splitlines()]
    traced = {line.get("request_id") for line in calls if line.get("method") == "Analyze"}
    assert {line["request_id"] for line in done} <= traced
    metrics = httpx.get(f"{batches.url}/metrics").text
    assert 'retinal_batch_images{state="done"}' in metrics

    # Ids and hashes in the logs, never the file names.
    logs = "".join(s.log for s in batches.stack.services.values() if s.process is not None)
    logs += "".join(w.log for w in batches.workers)
    assert batch_id in logs
    assert not any(name in logs for name in ("good-0.png", *bad))


def test_another_tenant_gets_404_for_every_batch_route(batches: BatchStack) -> None:
    batch_id = batches.submit([("eye.png", fundus_png(311))])
    for method, path in (
        ("GET", f"/v1/batches/{batch_id}"),
        ("GET", f"/v1/batches/{batch_id}/results.jsonl"),
        ("GET", f"/v1/batches/{batch_id}/results.csv"),
        ("DELETE", f"/v1/batches/{batch_id}"),
    ):
        reply = httpx.request(method, f"{batches.url}{path}", headers=auth("clinic-b"))
        _is_problem(reply, 404, "not-found")
    _is_problem(httpx.get(f"{batches.url}/v1/batches/{batch_id}", headers={}), 401, "unauthorized")
    assert batches.wait_final(batch_id, 60)["state"] == "completed"


def test_a_zip_s_unsafe_members_are_refused_through_the_api(batches: BatchStack) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("ok/eye.png", fundus_png(312))
        archive.writestr("../../outside.png", fundus_png(313))
        archive.writestr("nested.zip", b"PK\x05\x06" + bytes(18))  # an empty zip
    batch_id = batches.submit([("upload.zip", buffer.getvalue())])
    status = batches.wait_final(batch_id, 60)
    assert status["state"] == "completed_with_errors"
    assert {e["name"]: (e["state"], e["code"]) for e in status["errors"]} == {
        "../../outside.png": ("skipped", "unsafe_path"),
        "nested.zip": ("skipped", "nested_archive"),
    }
    assert status["counts"]["done"] == 1
    stored = batches.tmp / "batches" / batch_id
    assert [p.name for p in stored.iterdir()] == ["000000"]
    assert not (batches.tmp / "outside.png").exists()


def test_bad_requests_are_problems(batches: BatchStack) -> None:
    reply = httpx.post(
        f"{batches.url}/v1/batches",
        files=[("files", ("a.png", fundus_png()))],
        data={"overlays": "nope"},
        headers=auth("clinic-a"),
    )
    _is_problem(reply, 422, "validation-error")
    _is_problem(
        httpx.post(f"{batches.url}/v1/batches", headers=auth("clinic-a")), 422, "validation-error"
    )
    _is_problem(
        httpx.get(f"{batches.url}/v1/batches/nope", headers=auth("clinic-a")), 404, "not-found"
    )


def test_cancel_stops_what_has_not_started(batches: BatchStack) -> None:
    batch_id = batches.submit([(f"c{i}.png", fundus_png(320 + i)) for i in range(12)])
    reply = httpx.delete(f"{batches.url}/v1/batches/{batch_id}", headers=auth("clinic-a"))
    assert reply.status_code == 200, reply.text
    assert reply.json()["state"] == "cancelled"
    cancelled = reply.json()["counts"]["cancelled"]
    assert cancelled >= 1
    # What was running finishes; what was cancelled is never analysed.
    wait_until(lambda: batches.status(batch_id)["counts"]["running"] == 0, 30, "the worker")
    time.sleep(1.0)
    counts = batches.status(batch_id)["counts"]
    assert counts["cancelled"] == cancelled
    assert counts["done"] + counts["cancelled"] == 12


def test_the_cli_submits_follows_and_fetches_results(batches: BatchStack, tmp_path: Path) -> None:
    from cli.main import app

    folder = tmp_path / "eyes"
    (folder / "left").mkdir(parents=True)
    for i in range(3):
        (folder / "left" / f"{i}.png").write_bytes(fundus_png(340 + i))
    (folder / "readme.txt").write_text("not an image")
    runner = CliRunner()
    env = {"RETINAL_URL": batches.url, "RETINAL_API_KEY": KEYS["clinic-a"]}
    submitted = runner.invoke(app, ["batch", "submit", str(folder), "--wait"], env=env)
    assert submitted.exit_code == 0, submitted.output
    batch_id = submitted.stdout.strip().splitlines()[0]
    assert "completed_with_errors; 3 done, 1 failed" in submitted.stderr
    assert "4/4" in submitted.stderr  # the progress bar reached the end

    status = json.loads(runner.invoke(app, ["batch", "status", batch_id], env=env).stdout)
    assert status["errors"][0]["name"] == "eyes/readme.txt"
    out, table = tmp_path / "out.jsonl", tmp_path / "out.csv"
    fetched = runner.invoke(
        app, ["batch", "results", batch_id, "--output", str(out), "--csv", str(table)], env=env
    )
    assert fetched.exit_code == 0, fetched.output
    assert len(out.read_text().splitlines()) == 4
    assert sorted(row["source"] for row in csv.DictReader(table.open())) == [
        "eyes/left/0.png",
        "eyes/left/1.png",
        "eyes/left/2.png",
        "eyes/readme.txt",
    ]
    wrong = runner.invoke(app, ["batch", "status", batch_id], env={**env, "RETINAL_API_KEY": "x"})
    assert wrong.exit_code == 1


def test_a_repeated_task_changes_nothing(batches: BatchStack) -> None:
    from sqlalchemy import create_engine, text

    from services.worker.broker import create_celery
    from services.worker.settings import WorkerSettings

    batch_id = batches.submit([("again.png", fundus_png(350))])
    assert batches.wait_final(batch_id, 60)["state"] == "completed"
    before = batches.results(batch_id, "jsonl").text
    engine = create_engine(f"sqlite:///{batches.tmp / 'results.db'}")
    with engine.connect() as connection:
        image_id = connection.scalar(
            text("SELECT id FROM batch_images WHERE batch_id = :b"), {"b": batch_id}
        )
        analyses = connection.scalar(text("SELECT count(*) FROM analyses"))
    worker = batches.workers[0]
    skipped = worker.log.count("batch image not queued")
    client = create_celery(WorkerSettings(redis_url=batches.redis.url))
    for _ in range(2):  # as a redelivery would, twice
        client.send_task("retinal.analyze_batch_image", args=[image_id])
    wait_until(lambda: worker.log.count("batch image not queued") == skipped + 2, 30, "the tasks")
    with engine.connect() as connection:
        assert connection.scalar(text("SELECT count(*) FROM analyses")) == analyses
    engine.dispose()
    assert batches.results(batch_id, "jsonl").text == before
