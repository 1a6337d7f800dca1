"""Static checks of the container deployment: docker-compose.yml, the Dockerfiles under deploy/
(one per service, deploy/docker/<service>.Dockerfile) and .dockerignore.

No Docker engine and no network: the compose file is validated against the Compose
specification's JSON schema (the copy that check-jsonschema ships), and the files are parsed
and compared with the repository (files copied, modules run) and with the services' settings
defaults (ports, addresses).
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from pydantic_settings import BaseSettings

from services.analysis.settings import AnalysisSettings
from services.gateway.settings import GatewaySettings
from services.language.settings import LanguageSettings
from services.lesion.settings import LesionSettings
from services.worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
BUILT = sorted(name for name, service in SERVICES.items() if "build" in service)
# Settings classes by compose service name: the gRPC backends, the services that listen, and
# the clients of the backends (a field `<backend>_addr` per backend they call).
BACKENDS: dict[str, type[BaseSettings]] = {
    "analysis": AnalysisSettings,
    "lesion": LesionSettings,
    "language": LanguageSettings,
}
LISTENERS: dict[str, type[BaseSettings]] = {"gateway": GatewaySettings, **BACKENDS}
CLIENTS: dict[str, type[BaseSettings]] = {"gateway": GatewaySettings, "worker": WorkerSettings}
# Services with a Prometheus port, and the setting of the address it listens on.
METRICS: dict[str, tuple[type[BaseSettings], str]] = {
    **{name: (settings, "host") for name, settings in BACKENDS.items()},
    "worker": (WorkerSettings, "metrics_host"),
}
DOCKER = ROOT / "deploy" / "docker"
CALLS = sorted(
    (client, backend)
    for client, settings in CLIENTS.items()
    for backend in BACKENDS
    if f"{backend}_addr" in settings.model_fields
)
COMPOSE_TOP_LEVEL = {"name", "include", "services", "networks", "volumes", "configs", "secrets"}
MUST_IGNORE = {".git", ".venv", "var", "build", "dist"}
REDIS_SERVICE = "redis"
VARIABLE = re.compile(r"\$\{?(\w+)\}?")
PROJECT_INSTALL = re.compile(r"pip install\b.*\s\.(\s|$)")


# ---- Dockerfile model ----


@dataclass
class Stage:
    name: str | None
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)


@dataclass
class Dockerfile:
    stages: list[Stage]

    def stage(self, target: str | None) -> Stage:
        if target is None:
            return self.stages[-1]
        for stage in self.stages:
            if stage.name == target:
                return stage
        raise KeyError(f"no stage {target!r}")

    def chain(self, target: str | None) -> list[Stage]:
        """The target stage preceded by the stages it is built FROM, outermost first."""
        stage = self.stage(target)
        if stage.base in self.stage_names:
            return [*self.chain(stage.base), stage]
        return [stage]

    @property
    def stage_names(self) -> set[str]:
        return {stage.name for stage in self.stages if stage.name}

    def values(self, target: str | None, keyword: str) -> list[str]:
        return [
            args for stage in self.chain(target) for kw, args in stage.instructions if kw == keyword
        ]

    def last(self, target: str | None, keyword: str) -> str | None:
        values = self.values(target, keyword)
        return values[-1] if values else None

    def env(self, target: str | None) -> dict[str, str]:
        env: dict[str, str] = {}
        for args in self.values(target, "ENV"):
            env.update(token.split("=", 1) for token in shlex.split(args))
        return env


def _logical_lines(text: str) -> Iterator[str]:
    """Instructions with their continuation lines joined; comments dropped (also the ones
    inside a continuation, as Docker does)."""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instruction = (pending + line).strip()
        pending = ""
        if instruction:
            yield instruction


def _substitute(text: str, variables: dict[str, str]) -> str:
    return VARIABLE.sub(lambda match: variables.get(match[1], match[0]), text)


@cache
def parse_dockerfile(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(path.read_text()):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = [word for word in args.split() if not word.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(name, _substitute(words[0], global_args)))
        elif stages:
            stages[-1].instructions.append((keyword, args))
        elif keyword == "ARG":
            arg, _, default = args.partition("=")
            global_args[arg] = default
    return Dockerfile(stages)


def _argv(args: str) -> list[str]:
    """An exec-form (JSON) or shell-form command as a list of words."""
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def _healthcheck_argv(args: str) -> list[str] | None:
    """The command of a HEALTHCHECK instruction (None for HEALTHCHECK NONE)."""
    match = re.fullmatch(r"(?:--\S+\s+)*CMD\s+(.*)", args)
    return _argv(match[1]) if match else None


def _copy_sources(args: str) -> list[str]:
    """The build-context sources of a COPY/ADD (none for a copy from another stage)."""
    words = _argv(args)
    if any(word.startswith("--from=") for word in words):
        return []
    return [word for word in words if not word.startswith("--")][:-1]


def dockerfiles() -> list[Path]:
    return sorted(ROOT.glob("deploy/**/*Dockerfile*"))


# ---- compose model ----


def build_of(name: str) -> tuple[Path, Path, str | None]:
    """(context, Dockerfile, target) of a service built by compose."""
    build = SERVICES[name]["build"]
    if isinstance(build, str):
        build = {"context": build}
    context = ROOT / build.get("context", ".")
    return context, context / build.get("dockerfile", "Dockerfile"), build.get("target")


def image_of(name: str) -> tuple[Dockerfile, str | None]:
    _, dockerfile, target = build_of(name)
    return parse_dockerfile(dockerfile), target


def _compose_argv(value: str | list[str]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else list(value)


def service_argv(name: str) -> list[str]:
    """The process a service's container runs: entrypoint + command, compose over image."""
    service = SERVICES[name]
    entrypoint = _compose_argv(service.get("entrypoint", []))
    command = _compose_argv(service.get("command", []))
    if "build" in service:
        image, target = image_of(name)
        image_entrypoint = image.last(target, "ENTRYPOINT")
        image_command = image.last(target, "CMD")
        entrypoint = entrypoint or (_argv(image_entrypoint) if image_entrypoint else [])
        command = command or (_argv(image_command) if image_command else [])
    return entrypoint + command


def service_env(name: str) -> dict[str, str]:
    """The container's environment: the image's ENV overridden by compose's environment."""
    env: dict[str, str] = {}
    if "build" in SERVICES[name]:
        image, target = image_of(name)
        env.update(image.env(target))
    environment = SERVICES[name].get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    env.update({key: str(value) for key, value in environment.items()})
    return env


def healthchecks(name: str) -> list[list[str]]:
    """Every health-check command a service's container may run: compose's and the image's
    (the image's with the container's environment substituted)."""
    commands: list[list[str]] = []
    test = SERVICES[name].get("healthcheck", {}).get("test")
    if isinstance(test, str):
        commands.append(shlex.split(test))
    elif test and test[0] == "CMD":
        commands.append(test[1:])
    elif test and test[0] == "CMD-SHELL":
        commands.append(shlex.split(test[1]))
    if "build" in SERVICES[name]:
        image, target = image_of(name)
        instruction = image.last(target, "HEALTHCHECK")
        command = _healthcheck_argv(instruction) if instruction else None
        if command:
            env = service_env(name)
            commands.append([_substitute(word, env) for word in command])
    return commands


def depends_on(name: str) -> dict[str, str]:
    """Dependency -> condition (compose's short list form means service_started)."""
    dependencies = SERVICES[name].get("depends_on", {})
    if isinstance(dependencies, list):
        return dict.fromkeys(dependencies, "service_started")
    return {
        target: spec.get("condition", "service_started") for target, spec in dependencies.items()
    }


def container_ports(name: str) -> set[int]:
    ports: set[int] = set()
    for port in SERVICES[name].get("ports", []):
        target = port["target"] if isinstance(port, dict) else str(port).rpartition(":")[2]
        ports.add(int(str(target).partition("/")[0]))
    return ports


def listening(name: str) -> tuple[str, int]:
    """(host, port) a service listens on in its container: its settings read from the
    container's environment, falling back to the settings' defaults."""
    settings = LISTENERS[name]
    prefix = settings.model_config.get("env_prefix", "")
    env = service_env(name)
    host = env.get(f"{prefix}HOST", settings.model_fields["host"].default)
    return host, int(env.get(f"{prefix}PORT", settings.model_fields["port"].default))


def first_party_module(module: str, *, run: bool) -> Path | None:
    """The repo file behind `python -m module` (run) or `import module`, if any."""
    base = ROOT.joinpath(*module.split("."))
    candidates = [base.with_suffix(".py"), base / ("__main__.py" if run else "__init__.py")]
    return next((path for path in candidates if path.is_file()), None)


def referenced_modules(argv: list[str]) -> Iterator[tuple[str, bool]]:
    """(module, run) for `python -m MODULE` and a Celery `-A MODULE:app` in a command."""
    for flag, value in itertools.pairwise(argv):
        if flag == "-m":
            yield value, True
        elif flag in ("-A", "--app"):
            yield value.partition(":")[0], False


def is_first_party(module: str) -> bool:
    return (ROOT / module.partition(".")[0] / "__init__.py").is_file()


def is_pinned(image: str) -> bool:
    """A digest, or a tag carrying a version number (never `latest` or no tag)."""
    if "@sha256:" in image:
        return True
    tag = image.rpartition("/")[2].partition(":")[2]
    return bool(re.search(r"\d", tag)) and "$" not in image


# ---- compose file ----


def test_compose_file_matches_the_compose_specification() -> None:
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendored.joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(COMPOSE)]
    assert not errors


def test_compose_top_level_is_valid() -> None:
    assert "version" not in COMPOSE, "`version` is obsolete in the Compose specification"
    unknown = {key for key in COMPOSE if key not in COMPOSE_TOP_LEVEL and not key.startswith("x-")}
    assert not unknown
    assert SERVICES


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_has_image_or_build(name: str) -> None:
    assert "image" in SERVICES[name] or "build" in SERVICES[name]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_has_a_command(name: str) -> None:
    assert service_argv(name), f"{name}: no command in compose nor CMD/ENTRYPOINT in its image"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_has_a_healthcheck(name: str) -> None:
    assert not SERVICES[name].get("healthcheck", {}).get("disable", False)
    assert healthchecks(name), f"{name}: no healthcheck in compose nor HEALTHCHECK in its image"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_dependencies_exist_and_can_be_healthy(name: str) -> None:
    for target, condition in depends_on(name).items():
        assert target in SERVICES, f"{name} depends on unknown service {target}"
        if condition == "service_healthy":
            assert healthchecks(target), f"{name} waits for {target} to be healthy: no check"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_named_volumes_are_declared(name: str) -> None:
    for volume in SERVICES[name].get("volumes", []):
        source = volume.get("source", "") if isinstance(volume, dict) else volume.split(":")[0]
        if source and not source.startswith((".", "/", "~", "$")):
            assert source in (COMPOSE.get("volumes") or {}), f"{name}: undeclared {source}"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_images_are_pinned(name: str) -> None:
    if "image" in SERVICES[name] and "build" not in SERVICES[name]:
        assert is_pinned(SERVICES[name]["image"]), SERVICES[name]["image"]


@pytest.mark.parametrize("name", BUILT)
def test_build_dockerfile_and_target_exist(name: str) -> None:
    context, dockerfile, target = build_of(name)
    assert context.is_dir()
    assert dockerfile.is_file(), dockerfile
    if target is not None:
        assert target in parse_dockerfile(dockerfile).stage_names


@pytest.mark.parametrize("name", BUILT)
def test_runtime_image_runs_as_non_root(name: str) -> None:
    image, target = image_of(name)
    user = image.last(target, "USER")
    assert user is not None, f"{name}: no USER, so the container runs as root"
    assert user.partition(":")[0] not in {"root", "0"}


@pytest.mark.parametrize("name", BUILT)
def test_runtime_image_installs_nothing(name: str) -> None:
    """Runtime stages copy a finished venv: no pip there, so no build or dev tools either."""
    image, target = image_of(name)
    assert not any("pip install" in run for run in image.values(target, "RUN"))


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_modules_run_exist_in_the_repo(name: str) -> None:
    for argv in [service_argv(name), *healthchecks(name)]:
        for module, run in referenced_modules(argv):
            if is_first_party(module):
                assert first_party_module(module, run=run), f"{name}: no module {module} to run"


# ---- ports and addresses ----


@pytest.mark.parametrize("name", sorted(LISTENERS))
def test_listener_is_reachable_in_its_container(name: str) -> None:
    host, port = listening(name)
    assert host == "0.0.0.0", f"{name} listens on {host}: unreachable from other containers"
    image, target = image_of(name)
    exposed = {
        int(word.partition("/")[0])
        for args in image.values(target, "EXPOSE")
        for word in args.split()
    }
    assert port in exposed, f"{name} listens on {port}, its image exposes {exposed}"


@pytest.mark.parametrize("name", sorted(METRICS))
def test_metrics_ports_are_reachable_in_their_containers(name: str) -> None:
    settings, host_field = METRICS[name]
    prefix = settings.model_config.get("env_prefix", "")
    env = service_env(name)
    host = env.get(f"{prefix}{host_field}".upper(), settings.model_fields[host_field].default)
    port = int(env.get(f"{prefix}METRICS_PORT", settings.model_fields["metrics_port"].default))
    assert host == "0.0.0.0", f"{name}'s metrics listen on {host}"
    image, target = image_of(name)
    exposed = {int(word) for args in image.values(target, "EXPOSE") for word in args.split()}
    assert port in exposed, f"{name}'s metrics port {port} is not exposed"
    assert [str(port)] == [str(p) for p in SERVICES[name].get("expose", [])]


def test_gateway_publishes_its_port() -> None:
    assert GatewaySettings.model_fields["port"].default in container_ports("gateway")
    assert listening("gateway")[1] in container_ports("gateway")


@pytest.mark.parametrize(("client", "backend"), CALLS)
def test_clients_call_each_backend_where_it_listens(client: str, backend: str) -> None:
    prefix = CLIENTS[client].model_config.get("env_prefix", "")
    address = service_env(client).get(f"{prefix}{backend}_addr".upper())
    assert address == f"{backend}:{listening(backend)[1]}"
    assert depends_on(client).get(backend) == "service_healthy"


@pytest.mark.parametrize(("client", "backend"), CALLS)
def test_default_addresses_agree_with_default_ports(client: str, backend: str) -> None:
    """Without containers (one machine, local processes) the defaults must meet too."""
    default_address = CLIENTS[client].model_fields[f"{backend}_addr"].default
    default_port = BACKENDS[backend].model_fields["port"].default
    assert default_address.rpartition(":")[2] == str(default_port)


@pytest.mark.parametrize("name", sorted(LISTENERS))
def test_healthchecks_probe_the_listening_port(name: str) -> None:
    port = listening(name)[1]
    for argv in healthchecks(name):
        assert "shared.healthcheck" in argv, f"{name}: {argv}"
        probed = argv[argv.index("shared.healthcheck") + 2]
        url = urlsplit(probed if "://" in probed else f"//{probed}")
        assert url.port == port, f"{name} listens on {port}, its healthcheck probes {probed}"


def test_redis_clients_reach_the_redis_service() -> None:
    urls = {
        name: env["REDIS_URL"] for name in SERVICES if "REDIS_URL" in (env := service_env(name))
    }
    assert "worker" in urls, "the worker's broker would default to 127.0.0.1"
    for name, url in urls.items():
        assert urlsplit(url).hostname == REDIS_SERVICE, f"{name}: {url}"
        assert depends_on(name).get(REDIS_SERVICE) == "service_healthy", name


# ---- Dockerfiles ----


def test_dockerfiles_exist() -> None:
    assert dockerfiles()
    assert {build_of(name)[1] for name in BUILT} <= set(dockerfiles())


def test_one_dockerfile_per_service_and_compose_builds_each() -> None:
    """deploy/docker/<service>.Dockerfile for each service, built by the compose service of
    the same name (its final stage: no target)."""
    assert {path.name for path in dockerfiles()} == {f"{name}.Dockerfile" for name in BUILT}
    assert set(BUILT) == {*LISTENERS, "worker"}
    for name in BUILT:
        context, dockerfile, target = build_of(name)
        assert (context, dockerfile, target) == (ROOT, DOCKER / f"{name}.Dockerfile", None)


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda path: path.name)
def test_each_image_runs_its_service(path: Path) -> None:
    name = path.name.removesuffix(".Dockerfile")
    command = parse_dockerfile(path).last(None, "CMD")
    assert command is not None and _argv(command) == ["python", "-m", f"services.{name}"]
    assert first_party_module(f"services.{name}", run=True), f"no services/{name}/__main__.py"
    assert parse_dockerfile(path).last(None, "ENTRYPOINT") is None
    assert name in SERVICES and service_argv(name) == _argv(command)


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda path: path.name)
def test_images_are_multi_stage_and_run_as_non_root(path: Path) -> None:
    """A builder, and a runtime stage from a clean base image that copies the built venv."""
    dockerfile = parse_dockerfile(path)
    assert dockerfile.stage("builder") is not dockerfile.stages[-1]
    assert dockerfile.stages[-1].base not in dockerfile.stage_names
    copies = dockerfile.values(None, "COPY")
    assert "--from=builder /opt/venv /opt/venv" in copies
    user = dockerfile.last(None, "USER")
    assert user is not None and user.partition(":")[0] not in {"root", "0"}, f"USER {user}"
    assert not any("pip install" in run for run in dockerfile.values(None, "RUN"))


def test_the_builder_is_the_same_in_every_dockerfile() -> None:
    """Repeated in each file (compose cannot build a shared base first): never apart."""
    builders = {
        path.name: parse_dockerfile(path).stage("builder").instructions for path in dockerfiles()
    }
    first, *others = builders.values()
    assert all(builder == first for builder in others), sorted(builders)


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda path: path.name)
def test_copy_sources_exist(path: Path) -> None:
    for stage in parse_dockerfile(path).stages:
        for keyword, args in stage.instructions:
            if keyword not in {"COPY", "ADD"}:
                continue
            for source in _copy_sources(args):
                assert (ROOT / source).exists() or any(ROOT.glob(source)), f"{keyword} {source}"


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda path: path.name)
def test_base_images_are_pinned(path: Path) -> None:
    dockerfile = parse_dockerfile(path)
    for stage in dockerfile.stages:
        if stage.base not in dockerfile.stage_names:
            assert is_pinned(stage.base), f"FROM {stage.base}"


def _run_commands(stage: Stage) -> list[str]:
    """The stage's RUN instructions split at `&&`, in order."""
    return [
        command
        for keyword, args in stage.instructions
        if keyword == "RUN"
        for command in args.split("&&")
    ]


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda path: path.name)
def test_protos_are_generated_before_the_package_is_installed(path: Path) -> None:
    """A non-editable `pip install .` copies protos/ as it is: the stubs must be there."""
    installing = 0
    for stage in parse_dockerfile(path).stages:
        commands = _run_commands(stage)
        installs = [i for i, cmd in enumerate(commands) if PROJECT_INSTALL.search(cmd)]
        generates = [i for i, cmd in enumerate(commands) if "grpc_tools.protoc" in cmd]
        if installs:
            installing += 1
            assert generates and generates[0] < installs[0], f"stage {stage.name}"
    assert installing, "no stage installs the project (`pip install .`)"


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda path: path.name)
def test_dev_extra_is_never_installed(path: Path) -> None:
    installs = [
        command
        for stage in parse_dockerfile(path).stages
        for command in _run_commands(stage)
        if "pip install" in command
    ]
    assert installs
    assert not any(re.search(r"\[[^]]*\bdev\b", command) for command in installs), installs
    assert "[dev]" not in path.read_text()


def test_dockerignore_keeps_local_state_out() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert {line.strip().rstrip("/") for line in lines} >= MUST_IGNORE


def test_the_installed_package_carries_weights_and_console(tmp_path: Path) -> None:
    """A non-editable install (as in the images) must bring the data files the code loads."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = [
        *sorted((ROOT / "services").glob("*/weights/*")),
        *sorted((ROOT / "services/gateway/console").glob("*")),
    ]
    assert tracked
    missing = [str(p.relative_to(ROOT)) for p in tracked if str(p.relative_to(ROOT)) not in names]
    assert not missing
