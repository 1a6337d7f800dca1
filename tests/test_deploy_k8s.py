"""Static checks of deploy/k8s: every manifest valid against the Kubernetes JSON schemas
(kubernetes-validate, offline, strict), and consistent with the code (ports, settings, probes,
Dockerfiles, selectors, autoscalers, metrics ports)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic_settings import BaseSettings

from services.analysis.settings import AnalysisSettings
from services.gateway.settings import GatewaySettings
from services.language.settings import LanguageSettings
from services.lesion.settings import LesionSettings
from services.worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"
SETTINGS: dict[str, type[BaseSettings]] = {
    "analysis": AnalysisSettings,
    "lesion": LesionSettings,
    "language": LanguageSettings,
    "gateway": GatewaySettings,
    "worker": WorkerSettings,
}
GRPC_BACKENDS = ("analysis", "lesion", "language")
DOCKERFILES = ROOT / "deploy" / "docker"


@cache
def documents() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for resource in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / resource).read_text()) if d]
    return docs


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in documents() if d["kind"] == kind}


def workloads() -> dict[str, dict[str, Any]]:
    return {**of_kind("Deployment"), **of_kind("StatefulSet")}


def containers(workload: str) -> list[dict[str, Any]]:
    return list(workloads()[workload]["spec"]["template"]["spec"]["containers"])


def container(name: str) -> dict[str, Any]:
    """The workload's container of the same name (the language pod also runs a vLLM sidecar)."""
    (found,) = [c for c in containers(name) if c["name"] == name]
    return found


def config() -> dict[str, str]:
    return of_kind("ConfigMap")["retinal-config"]["data"]


@pytest.mark.parametrize(
    "document", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}"
)
def test_each_manifest_matches_the_kubernetes_schema(document: dict[str, Any]) -> None:
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_each_service_runs_its_own_image_and_entry_point_as_non_root() -> None:
    for name in SETTINGS:
        spec = workloads()[name]["spec"]["template"]["spec"]
        image = container(name)["image"]
        assert image.startswith(f"retinalgpt/{name}:")
        assert (DOCKERFILES / f"{name}.Dockerfile").is_file()
        assert "command" not in container(name)  # the Dockerfile's CMD runs
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 10001  # the Dockerfiles' user


@pytest.mark.parametrize("name", GRPC_BACKENDS)
def test_grpc_services_expose_their_ports_and_probe_grpc_health(name: str) -> None:
    defaults = SETTINGS[name]
    ports = {p["name"]: p["containerPort"] for p in container(name)["ports"]}
    assert ports == {
        "grpc": defaults.model_fields["port"].default,
        "metrics": defaults.model_fields["metrics_port"].default,
    }
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container(name)[probe]["grpc"]["port"] == ports["grpc"]
    service = of_kind("Service")[name]["spec"]
    assert service["clusterIP"] == "None"  # headless: clients balance over the pods
    assert {p["targetPort"] for p in service["ports"]} == set(ports)


def test_the_gateway_probes_its_health_endpoints() -> None:
    gateway = container("gateway")
    assert gateway["ports"] == [
        {"name": "http", "containerPort": GatewaySettings.model_fields["port"].default}
    ]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.parametrize("name", [*GRPC_BACKENDS, "worker"])
def test_prometheus_scrapes_each_metrics_port(name: str) -> None:
    port = SETTINGS[name].model_fields["metrics_port"].default
    annotations = workloads()[name]["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port)}
    assert {"name": "metrics", "containerPort": port} in container(name)["ports"]


def test_the_worker_exposes_only_its_metrics() -> None:
    assert container("worker")["ports"] == [
        {"name": "metrics", "containerPort": WorkerSettings.model_fields["metrics_port"].default}
    ]


def test_config_keys_are_settings_the_services_read() -> None:
    for key in config():
        if key == "REDIS_URL":
            continue
        prefix, _, field = key.removeprefix("RETINAL_").partition("_")
        settings = SETTINGS[prefix.lower()]
        assert field.lower() in settings.model_fields, key


def test_backend_addresses_name_existing_services_and_ports() -> None:
    services = of_kind("Service")
    for key, value in config().items():
        if not key.endswith("_ADDR"):
            continue
        host, port = value.removeprefix("dns:///").rsplit(":", 1)
        backend = key.removesuffix("_ADDR").rsplit("_", 1)[-1].lower()
        assert host == backend and host in services
        assert int(port) == SETTINGS[backend].model_fields["port"].default
    assert config()["REDIS_URL"].startswith("redis://redis:6379")


def test_services_select_pods_and_autoscalers_scale_deployments() -> None:
    for name, service in of_kind("Service").items():
        selected = [
            w
            for w in workloads().values()
            if service["spec"]["selector"].items()
            <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, name
    autoscaled = {
        hpa["spec"]["scaleTargetRef"]["name"] for hpa in of_kind("HorizontalPodAutoscaler").values()
    }
    assert autoscaled == {"analysis", "lesion", "worker"}
    assert autoscaled <= set(of_kind("Deployment"))


def test_the_language_service_gets_a_gpu_on_gpu_nodes() -> None:
    """vLLM's server is the pod's sidecar with the GPU; the service talks to it on localhost
    and reads the same checkpoint folder (its model card)."""
    (vllm,) = [c for c in containers("language") if c["name"] == "vllm"]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    spec = workloads()["language"]["spec"]["template"]["spec"]
    assert spec["nodeSelector"] and spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    env = {e["name"]: e["value"] for e in container("language")["env"]}
    assert env["RETINAL_LANGUAGE_BACKEND"] == "vllm"
    port = next(a for a in vllm["args"] if a.startswith("--port=")).partition("=")[2]
    assert env["RETINAL_LANGUAGE_VLLM_URL"] == f"http://127.0.0.1:{port}"
    model = next(a for a in vllm["args"] if a.startswith("--model=")).partition("=")[2]
    served = next(a for a in vllm["args"] if a.startswith("--served-model-name="))
    assert env["RETINAL_LANGUAGE_MODEL_DIR"] == model and served.endswith(Path(model).name)


def test_every_container_has_requests_and_limits() -> None:
    for name in workloads():
        for each in containers(name):
            resources = each["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) & set(resources["limits"]), name
