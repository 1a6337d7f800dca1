"""The gateway's stored analyses, overlays, model cards and tenants, over a running stack."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from PIL import Image

from services.gateway.tenants import digest, load_keys, new_key
from tests.conftest import DATASETS, Stack, fundus_png
from tests.test_gateway import _is_problem

pytestmark = pytest.mark.slow

KEYS = {"clinic-a": new_key(), "clinic-b": new_key()}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack whose gateway knows two tenants by their keys' digests."""
    configured = ",".join(f"{tenant}:{digest(key)}" for tenant, key in KEYS.items())
    running = Stack(
        tmp_path_factory.mktemp("secured"), extra_env={"RETINAL_GATEWAY_API_KEYS": configured}
    )
    try:
        running.start()
        yield running
    finally:
        running.stop()


def _auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def _analyse(stack: Stack, tenant: str, overlays: str = "lesions,vessels") -> httpx.Response:
    return httpx.post(
        f"{stack.url}/v1/analyses",
        files={"file": ("eye.png", fundus_png())},
        data={"overlays": overlays},
        headers=_auth(tenant),
        timeout=60,
    )


def test_requests_without_a_valid_key_are_refused(secured: Stack) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic eDp5"}):
        reply = httpx.post(
            f"{secured.url}/v1/analyses",
            files={"file": ("eye.png", fundus_png())},
            headers=headers,
            timeout=30,
        )
        _is_problem(reply, 401, "unauthorized")
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    assert (
        "not known"
        in httpx.get(
            f"{secured.url}/v1/analyses/x", headers={"Authorization": "Bearer nope"}
        ).json()["detail"]
    )
    # The keys themselves never reach the log.
    assert all(key not in secured.services["gateway"].log for key in KEYS.values())


def test_an_analysis_is_stored_and_only_its_tenant_sees_it(secured: Stack) -> None:
    created = _analyse(secured, "clinic-a")
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["cached"] is False
    assert set(body["overlays"]) == {"lesions", "vessels"}

    fetched = httpx.get(f"{secured.url}/v1/analyses/{body['id']}", headers=_auth("clinic-a"))
    assert fetched.status_code == 200
    assert fetched.json()["findings"] == body["findings"]
    png = httpx.get(f"{secured.url}{body['overlays']['lesions']}", headers=_auth("clinic-a"))
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).format == "PNG"

    report = httpx.get(f"{secured.url}/v1/analyses/{body['id']}/fhir", headers=_auth("clinic-a"))
    assert report.headers["content-type"].startswith("application/fhir+json")
    parsed = Bundle.model_validate_json(report.content)
    assert parsed.entry[0].resource.id == body["id"]

    for path in (
        f"/v1/analyses/{body['id']}",
        body["overlays"]["lesions"],
        f"/v1/analyses/{body['id']}/fhir",
    ):
        _is_problem(httpx.get(f"{secured.url}{path}", headers=_auth("clinic-b")), 404, "not-found")
    missing = httpx.get(
        f"{secured.url}/v1/analyses/{body['id']}/overlays/disc.png", headers=_auth("clinic-a")
    )
    _is_problem(missing, 404, "not-found")


def test_the_same_image_and_models_return_the_stored_result(secured: Stack) -> None:
    first = _analyse(secured, "clinic-a", "lesions").json()
    again = _analyse(secured, "clinic-a", "lesions").json()
    assert (again["id"], again["cached"]) == (first["id"], True)
    assert again["findings"] == first["findings"]
    other_options = _analyse(secured, "clinic-a", "ma").json()
    assert other_options["id"] != first["id"]
    # Another tenant sending the same image gets its own analysis, not clinic-a's.
    theirs = _analyse(secured, "clinic-b", "lesions").json()
    assert theirs["id"] != first["id"] and theirs["cached"] is False


def test_unknown_overlay_layers_are_a_422(secured: Stack) -> None:
    reply = _analyse(secured, "clinic-a", "lesions,arteries")
    _is_problem(reply, 422, "validation-error")
    assert "arteries" in reply.json()["detail"]


def test_model_cards_of_every_served_model(secured: Stack) -> None:
    reply = httpx.get(f"{secured.url}/v1/models", headers=_auth("clinic-b"), timeout=10)
    assert reply.status_code == 200, reply.text
    cards = {card["name"]: card for card in reply.json()["models"]}
    assert {"quality", "vessel-av-unet", "disc_cup", "lesion-unet"} <= set(cards)
    assert cards["lesion-unet"]["service"] == "lesion"
    assert all(len(card["sha256"]) == 64 for card in cards.values())


@pytest.mark.parametrize(
    ("configured", "message"),
    [
        ("clinic-a:abc", "SHA-256 hex digest"),
        (f"bad tenant!:{'0' * 64}", "bad tenant name"),
        (f"a:{'0' * 64},b:{'0' * 64}", "two tenants"),
    ],
)
def test_bad_key_configuration_stops_the_gateway_at_start(configured: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_keys(configured, None)


def test_retinal_api_key_prints_a_key_and_its_digest_entry() -> None:
    from typer.testing import CliRunner

    from cli.main import app

    run = CliRunner().invoke(app, ["api-key", "clinic-c"])
    assert run.exit_code == 0, run.output
    lines = dict(line.split(": ", 1) for line in run.output.strip().splitlines())
    key, entry = lines["key (shown once)"], lines["RETINAL_GATEWAY_API_KEYS entry"]
    assert load_keys(entry, None) == {digest(key): "clinic-c"}
    assert CliRunner().invoke(app, ["api-key", "no spaces"]).exit_code != 0


def test_the_gateway_knows_the_overlay_layers_each_service_renders() -> None:
    from services.analysis.engine.overlays import LAYERS as ANALYSIS_LAYERS
    from services.lesion.engine.overlays import LAYERS as LESION_LAYERS
    from shared.pipeline import ANALYSIS_OVERLAYS, LESION_OVERLAYS

    assert set(ANALYSIS_OVERLAYS) == set(ANALYSIS_LAYERS)
    assert set(LESION_OVERLAYS) == set(LESION_LAYERS)


def test_each_tenant_has_its_own_rate_limit(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from services.gateway.app import create_app
    from services.gateway.settings import GatewaySettings

    settings = GatewaySettings(
        results_url=f"sqlite:///{tmp_path / 'results.db'}",
        api_keys=",".join(f"{tenant}:{digest(key)}" for tenant, key in KEYS.items()),
        rate_limit_requests="3/minute",
    )
    with TestClient(create_app(settings)) as client:
        codes = [
            client.get("/v1/analyses/nope", headers=_auth("clinic-a")).status_code for _ in range(4)
        ]
        assert codes == [404, 404, 404, 429]
        limited = client.get("/v1/analyses/nope", headers=_auth("clinic-a"))
        _is_problem(limited, 429, "rate-limited")
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        # Another tenant's budget is untouched.
        assert client.get("/v1/analyses/nope", headers=_auth("clinic-b")).status_code == 404


def test_a_dicom_upload_is_analysed_and_no_patient_data_reaches_the_logs(secured: Stack) -> None:
    from tests.test_ingestion import dicom, fundus

    reply = httpx.post(
        f"{secured.url}/v1/analyses",
        files={"file": ("study.dcm", dicom(fundus(), PixelSpacing=[0.0065, 0.0065]))},
        headers={**_auth("clinic-a"), "X-Request-ID": "dicom-1"},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    image = reply.json()["findings"]["image"]
    assert (image["format"], image["dicom_modality"]) == ("DICOM", "OP")
    assert image["calibration"] == {"source": "dicom", "pixel_size_um": 6.5}
    logs = "".join(service.log for service in secured.services.values())
    assert "dicom-1" in logs  # the request was logged...
    assert "Doe^Jane" not in logs and "PID-SECRET-42" not in logs  # ...without the patient


def test_the_request_id_reaches_every_service_and_each_serves_metrics(secured: Stack) -> None:
    reply = httpx.post(
        f"{secured.url}/v1/analyses",
        files={"file": ("eye.png", fundus_png(300))},
        headers={**_auth("clinic-b"), "X-Request-ID": "trace-me-1"},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    for service, method in (("analysis", "Analyze"), ("lesion", "Detect")):
        lines = [json.loads(line) for line in secured.services[service].log.splitlines()]
        calls = [line for line in lines if line.get("request_id") == "trace-me-1"]
        assert {(c["message"], c["method"], c["code"]) for c in calls} >= {
            ("call", method, "OK")
        }, secured.services[service].log[-2000:]
        metrics = httpx.get(f"http://127.0.0.1:{secured.metrics_ports[service]}/metrics").text
        assert (
            f'retinal_grpc_requests_total{{code="OK",method="{method}",service="{service}"}}'
            in metrics
        )
        assert "retinal_grpc_request_duration_seconds_bucket" in metrics
        assert 'retinal_model_info{name="' in metrics and f'service="{service}"' in metrics
    language = httpx.get(f"http://127.0.0.1:{secured.metrics_ports['language']}/metrics").text
    assert "# TYPE retinal_grpc_requests_total counter" in language
    gateway_lines = [json.loads(line) for line in secured.services["gateway"].log.splitlines()]
    assert any(line.get("request_id") == "trace-me-1" for line in gateway_lines)


def test_a_real_photograph_keeps_its_disc_based_calibration_through_the_gateway(
    secured: Stack,
) -> None:
    path = DATASETS / "DRIVE" / "test" / "images" / "01_test.tif"
    if not path.exists():
        pytest.skip("datasets are absent")
    reply = httpx.post(
        f"{secured.url}/v1/analyses",
        files={"file": ("eye.tif", path.read_bytes())},
        headers=_auth("clinic-a"),
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    found = reply.json()["findings"]
    assert found["quality"]["grade"] in {"good", "usable"}
    calibration = found["image"]["calibration"]
    assert calibration["source"] == "disc_diameter" and calibration["pixel_size_um"] > 0
    assert found["disc"]["cdr_vertical"] is not None
    assert {s["stage"]: s["state"] for s in found["stages"]}["lesion"] == "ok"
    assert found["assessment"]["glaucoma_suspect"] in {True, False}


def test_the_console_is_served_at_the_root_and_knows_every_overlay(secured: Stack) -> None:
    page = httpx.get(f"{secured.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<form id="upload">' in page.text and 'src="console.js"' in page.text
    script = httpx.get(f"{secured.url}/console.js")
    assert "javascript" in script.headers["content-type"]
    from shared.pipeline import OVERLAY_LAYERS

    declared = script.text.split("const LAYERS = [", 1)[1].split("]", 1)[0]
    assert [layer.strip().strip('"') for layer in declared.split(",")] == list(OVERLAY_LAYERS)
    assert httpx.get(f"{secured.url}/console.css").status_code == 200
    # The console is public (it holds no data); the API behind it still wants a key.
    assert httpx.get(f"{secured.url}/v1/models").status_code == 401


def test_the_console_script_parses() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("no Node.js to parse the console script with")
    script = Path(__file__).resolve().parents[1] / "services/gateway/console/console.js"
    checked = subprocess.run([node, "--check", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_keys_rotate_by_editing_the_key_file_without_a_restart(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from services.gateway.app import create_app
    from services.gateway.settings import GatewaySettings

    old, new = new_key(), new_key()
    key_file = tmp_path / "keys.json"

    def write(content: str, step: int) -> None:
        key_file.write_text(content)
        os.utime(key_file, ns=(step * 10**9, step * 10**9))  # a new stamp even within 1 s

    write(json.dumps({"clinic-a": [digest(old)]}), 1)
    settings = GatewaySettings(
        results_url=f"sqlite:///{tmp_path / 'results.db'}", api_keys_file=key_file
    )

    def status(client: TestClient, key: str) -> int:
        return client.get("/v1/analyses/x", headers={"Authorization": f"Bearer {key}"}).status_code

    with TestClient(create_app(settings)) as client:
        assert (status(client, old), status(client, new)) == (404, 401)
        write(json.dumps({"clinic-a": [digest(old), digest(new)]}), 2)  # both, while clients move
        assert (status(client, old), status(client, new)) == (404, 404)
        write(json.dumps({"clinic-a": [digest(new)]}), 3)  # the old key retired
        assert (status(client, old), status(client, new)) == (401, 404)
        write("{not json", 4)  # a broken edit keeps the keys in force
        assert (status(client, old), status(client, new)) == (401, 404)
