"""The gateway over a running stack (real services over gRPC)."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Stack, fundus_png, reported_lesion_types, wait_until

pytestmark = pytest.mark.slow


def _is_problem(reply: httpx.Response, status: int, code: str) -> None:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/problem+json")
    body = reply.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"] == f"/problems/{code}"


def test_healthz_and_openapi(stack: Stack) -> None:
    assert httpx.get(f"{stack.url}/healthz").json() == {"status": "ok"}
    spec = httpx.get(f"{stack.url}/openapi.json").json()
    assert {
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/analyses",
        "/v1/analyses/{analysis_id}",
        "/v1/analyses/{analysis_id}/overlays/{layer}.png",
        "/v1/analyses/{analysis_id}/fhir",
        "/v1/models",
    } <= set(spec["paths"])


def test_readyz_follows_a_backend_down_and_back(stack: Stack) -> None:
    reply = httpx.get(f"{stack.url}/readyz")
    assert reply.status_code == 200, reply.text
    assert set(reply.json()["backends"].values()) == {"SERVING"}

    stack.services["lesion"].stop()
    reply = httpx.get(f"{stack.url}/readyz", timeout=10)
    _is_problem(reply, 503, "not-ready")
    assert reply.json()["backends"]["lesion"] != "SERVING"
    assert reply.json()["backends"]["analysis"] == "SERVING"
    # Work that needs the stopped backend gets a clear 503, not a hang or a 500.
    upload = httpx.post(f"{stack.url}/v1/analyses", files={"file": ("x", fundus_png())}, timeout=30)
    _is_problem(upload, 503, "backend-unavailable")
    assert "lesion" in upload.json()["detail"]

    stack.start_backend("lesion")
    wait_until(
        lambda: httpx.get(f"{stack.url}/readyz", timeout=5).status_code == 200, 30, "ready again"
    )


def test_an_analysis_reports_the_image_and_refuses_to_measure_a_non_photograph(
    stack: Stack,
) -> None:
    reply = httpx.post(
        f"{stack.url}/v1/analyses",
        files={"file": ("ignored-name.jpg", fundus_png())},
        data={"pixel_size_um": "6.5"},
        headers={"X-Request-ID": "test-123"},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["X-Request-ID"] == "test-123"
    found = reply.json()["findings"]
    assert found["image"]["format"] == "PNG"  # sniffed from the content, not the name
    assert (found["image"]["width"], found["image"]["height"]) == (256, 256)
    assert found["image"]["calibration"] == {"source": "request", "pixel_size_um": 6.5}
    fov = found["image"]["field_of_view"]
    assert abs(fov["center_x"] - 128) < 4 and abs(fov["radius"] - 115) < 6
    states = {s["stage"]: s["state"] for s in found["stages"]}
    assert states["analysis"] == "ok"
    # A flat orange disc has the silhouette of a fundus photograph and nothing else in it.
    assert found["quality"]["grade"] == "reject"
    assert found["quality"]["reasons"]
    assert states["vessels"] == states["features"] == "skipped"
    assert found.get("vessels") is None and found.get("disc") is None
    assert {m["name"] for m in found["models"]} >= {"quality", "lesion-unet"}
    # Lesions ran too, but a rejected image is not graded: the assessment says why.
    assert states["lesion"] == "ok"
    assert len(found["lesion_counts"]) == len(reported_lesion_types())
    assert found["assessment"].get("dr_grade") is None
    assert "ungradable" in found["assessment"]["reasons"][0]


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (b"", 422, "empty"),
        (b"%PDF-1.7\n" + b"x" * 200, 415, "unsupported_format"),
        (fundus_png()[:300], 422, "truncated"),
    ],
)
def test_bad_uploads_get_problem_details(
    stack: Stack, content: bytes, status: int, code: str
) -> None:
    reply = httpx.post(f"{stack.url}/v1/analyses", files={"file": ("f", content)}, timeout=30)
    _is_problem(reply, status, code)


def test_a_request_without_a_file_is_a_validation_problem(stack: Stack) -> None:
    reply = httpx.post(f"{stack.url}/v1/analyses", data={"pixel_size_um": "-1"})
    _is_problem(reply, 422, "validation-error")


def test_unknown_paths_are_problems_too(stack: Stack) -> None:
    _is_problem(httpx.get(f"{stack.url}/v1/nothing-here"), 404, "not-found")


def test_metrics_expose_requests_and_backend_state(stack: Stack) -> None:
    httpx.get(f"{stack.url}/readyz")
    text = httpx.get(f"{stack.url}/metrics").text
    assert 'retinal_gateway_http_requests_total{method="GET",route="/readyz"' in text
    assert 'retinal_gateway_backend_up{backend="analysis"} 1.0' in text
    assert "retinal_gateway_http_request_duration_seconds_bucket" in text
