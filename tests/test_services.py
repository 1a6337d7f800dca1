"""Each gRPC service over real gRPC: health, reflection, limits, validation, SIGTERM."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.retinal.v1 import (
    analysis_pb2,
    analysis_pb2_grpc,
    common_pb2,
    findings_pb2,
    language_pb2,
    language_pb2_grpc,
    lesion_pb2,
    lesion_pb2_grpc,
)
from shared import findings, pixels
from shared.healthcheck import grpc_serving
from tests.conftest import (
    BACKENDS,
    ServiceProcess,
    Stack,
    free_port,
    reported_lesion_types,
    wait_until,
)

SERVICE_NAMES = {
    "analysis": "retinal.v1.AnalysisService",
    "lesion": "retinal.v1.LesionService",
    "language": "retinal.v1.LanguageService",
}

pytestmark = pytest.mark.slow


def _image(height: int = 32, width: int = 48) -> common_pb2.NormalizedImage:
    rgb = np.zeros((height, width, 3), np.uint8)
    return pixels.to_message(rgb, findings.ImageInfo(width=width, height=height))


@pytest.mark.parametrize("name", BACKENDS)
def test_health_is_serving_for_server_and_service(backends: Stack, name: str) -> None:
    with grpc.insecure_channel(backends.address(name)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAMES[name]):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as error:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("name", BACKENDS)
def test_reflection_lists_the_service(backends: Stack, name: str) -> None:
    with grpc.insecure_channel(backends.address(name)) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
        names = {s.name for s in reply.list_services_response.service}
    assert {SERVICE_NAMES[name], "grpc.health.v1.Health"} <= names


def test_analysis_refuses_pixels_that_do_not_match_their_shape(backends: Stack) -> None:
    image = _image()
    image.width += 1
    with grpc.insecure_channel(backends.address("analysis")) as channel:
        stub = analysis_pb2_grpc.AnalysisServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.Analyze(analysis_pb2.AnalyzeRequest(image=image), timeout=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected" in error.value.details()


def test_analysis_grades_a_black_image_as_reject_and_measures_nothing(backends: Stack) -> None:
    with grpc.insecure_channel(backends.address("analysis")) as channel:
        reply = analysis_pb2_grpc.AnalysisServiceStub(channel).Analyze(
            analysis_pb2.AnalyzeRequest(image=_image()), timeout=60
        )
    assert reply.findings.quality.grade == findings_pb2.QUALITY_GRADE_REJECT
    assert not reply.findings.HasField("vessels")


def test_lesion_detect_answers_a_black_image_with_a_valid_response(
    backends: Stack,
) -> None:
    with grpc.insecure_channel(backends.address("lesion")) as channel:
        reply = lesion_pb2_grpc.LesionServiceStub(channel).Detect(
            lesion_pb2.DetectRequest(image=_image()), timeout=30
        )
    assert len(reply.counts) == len(reported_lesion_types())
    # The lesion network and its context model (services/lesion/weights).
    assert [m.name for m in reply.models] == ["lesion-unet", "lesion-context-unet"]
    assert all(len(m.sha256) == 64 for m in reply.models)
    assert reply.HasField("assessment")


@pytest.mark.parametrize(
    ("turns", "message"),
    [
        ([], "empty"),
        ([language_pb2.Turn(role=language_pb2.ROLE_ASSISTANT, text="hi")], "user turn"),
    ],
)
def test_language_refuses_conversations_it_cannot_answer(
    backends: Stack, turns: list[language_pb2.Turn], message: str
) -> None:
    request = language_pb2.ChatRequest(conversation=turns)
    with grpc.insecure_channel(backends.address("language")) as channel:
        stub = language_pb2_grpc.LanguageServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.Chat(request, timeout=5)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in error.value.details()
        with pytest.raises(grpc.RpcError) as error:
            list(stub.ChatStream(request, timeout=5))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("name", BACKENDS)
def test_list_models_names_the_service(backends: Stack, name: str) -> None:
    stubs = {
        "analysis": analysis_pb2_grpc.AnalysisServiceStub,
        "lesion": lesion_pb2_grpc.LesionServiceStub,
        "language": language_pb2_grpc.LanguageServiceStub,
    }
    with grpc.insecure_channel(backends.address(name)) as channel:
        reply = stubs[name](channel).ListModels(common_pb2.ListModelsRequest(), timeout=5)
    assert reply.service == SERVICE_NAMES[name]


def test_messages_over_the_size_limit_are_refused(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "RETINAL_ANALYSIS_PORT": str(port),
        "RETINAL_ANALYSIS_MAX_MESSAGE_MB": "1",
    }
    service = ServiceProcess("analysis", env, tmp_path / "analysis.log")
    service.start()
    try:
        address = f"127.0.0.1:{port}"
        wait_until(lambda: grpc_serving(address), 30, "analysis")
        big = _image(height=700, width=700)  # 1.47 MB of pixels
        options = [("grpc.max_send_message_length", 64 * 2**20)]
        with (
            grpc.insecure_channel(address, options=options) as channel,
            pytest.raises(grpc.RpcError) as error,
        ):
            analysis_pb2_grpc.AnalysisServiceStub(channel).Analyze(
                analysis_pb2.AnalyzeRequest(image=big), timeout=10
            )
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        service.stop()


@pytest.mark.parametrize("name", BACKENDS)
def test_sigterm_stops_gracefully(tmp_path: Path, name: str) -> None:
    port = free_port()
    env = {
        **os.environ,
        f"RETINAL_{name.upper()}_PORT": str(port),
        # the vLLM sidecar's own shutdown is tested in test_language_service
        "RETINAL_LANGUAGE_BACKEND": "transformers",
    }
    service = ServiceProcess(name, env, tmp_path / f"{name}.log")
    service.start()
    try:
        wait_until(lambda: grpc_serving(f"127.0.0.1:{port}"), 30, name)
    except TimeoutError:
        service.stop(signal.SIGKILL)
        raise
    assert service.stop(signal.SIGTERM, timeout_s=15) == 0
    assert '"message": "stopped"' in service.log
