"""Fixtures that start real processes: gRPC services, the gateway, Redis, Celery workers."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from shared.healthcheck import grpc_serving

REPO = Path(__file__).resolve().parents[1]
# ../shared/datasets beside the checkout, unless RETINAL_DATASETS names another place.
DATASETS = Path(os.environ.get("RETINAL_DATASETS", REPO.parent / "shared" / "datasets"))
BACKENDS = ("analysis", "lesion", "language")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


def fundus_png(size: int = 256) -> bytes:
    """A bright orange disc on black: enough of a fundus for ingestion."""
    yy, xx = np.mgrid[:size, :size]
    inside = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (size * 0.45) ** 2
    rgb = np.zeros((size, size, 3), np.uint8)
    rgb[inside] = (200, 90, 40)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class ServiceProcess:
    """One service (`python -m services.<name>`) run as a child process."""

    name: str
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.name}"],
            env=self.env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def stop(self, sig: int = 15, timeout_s: float = 20.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Stack:
    """The three backends and the gateway on free ports."""

    tmp: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ports = {name: free_port() for name in (*BACKENDS, "gateway")}
        self.metrics_ports = {name: free_port() for name in BACKENDS}
        env = dict(os.environ)
        for name in BACKENDS:
            env[f"RETINAL_{name.upper()}_PORT"] = str(self.ports[name])
            env[f"RETINAL_{name.upper()}_METRICS_PORT"] = str(self.metrics_ports[name])
            env[f"RETINAL_GATEWAY_{name.upper()}_ADDR"] = self.address(name)
            env[f"RETINAL_WORKER_{name.upper()}_ADDR"] = self.address(name)
        env["RETINAL_GATEWAY_PORT"] = str(self.ports["gateway"])
        env["RETINAL_GATEWAY_HEALTH_DEADLINE_S"] = "1.0"
        env["RETINAL_GATEWAY_RESULTS_URL"] = f"sqlite:///{self.tmp / 'results.db'}"
        # Batches stay in this folder, and off any shared Redis (the embedded broker here).
        env["RETINAL_BATCH_DIR"] = str(self.tmp / "batches")
        env["RETINAL_WORKER_EMBEDDED_BROKER_DIR"] = str(self.tmp / "queue")
        # Workers may share this environment: no metrics port (tests/test_worker_metrics.py).
        env["RETINAL_WORKER_METRICS_PORT"] = "0"
        env["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
        # RetinalGPT-mini in-process (seconds to load); the vLLM sidecar is tested on its own.
        env["RETINAL_LANGUAGE_BACKEND"] = "transformers"
        env.update(self.extra_env)
        self.env = env
        for name in (*BACKENDS, "gateway"):
            self.services[name] = ServiceProcess(name, env, self.tmp / f"{name}.log")

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    def start_backend(self, name: str) -> None:
        self.services[name].start()
        wait_until(lambda: grpc_serving(self.address(name)), 30, f"{name} SERVING")

    def start(
        self, with_gateway: bool = True, timeout_s: float = 30, backends: Sequence[str] = BACKENDS
    ) -> None:
        for name in backends:
            self.services[name].start()
        if with_gateway:
            self.services["gateway"].start()
        for name in backends:
            wait_until(lambda n=name: grpc_serving(self.address(n)), timeout_s, f"{name} SERVING")
        if with_gateway:
            wait_until(self._gateway_up, timeout_s, "the gateway")

    def _gateway_up(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        for service in self.services.values():
            if service.process is not None:
                service.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The three backends and the gateway."""
    running = Stack(tmp_path_factory.mktemp("stack"))
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The three backends alone."""
    running = Stack(tmp_path_factory.mktemp("backends"))
    try:
        running.start(with_gateway=False)
        yield running
    finally:
        running.stop()


@dataclass
class RedisServer:
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, 10, "redis-server")

    def _answers(self) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(free_port(), tmp_path)
    server.start()
    yield server
    server.stop()


@dataclass
class PostgresCluster:
    """A PostgreSQL cluster of its own (initdb) on a free port, to stop and restart at will
    without disturbing the machine's server. Run as the postgres user: initdb refuses root."""

    directory: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *command: str) -> None:
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*as_postgres, *command], check=True, capture_output=True, timeout=60)

    def create(self) -> None:
        initdb = shutil.which("initdb") or "initdb"
        data = str(self.directory / "data")
        self._run(initdb, "-D", data, "-U", "postgres", "--auth=trust", "--no-sync")

    def _pg_ctl(self, *args: str) -> None:
        pg_ctl = shutil.which("pg_ctl") or "pg_ctl"
        self._run(pg_ctl, "-D", str(self.directory / "data"), "-w", "-t", "30", *args)

    def start(self) -> None:
        # Sockets in its own folder, and no fsync: a test cluster, fast to stop and start.
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg_ctl("-l", str(self.directory / "postgres.log"), "-o", options, "start")

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "stop")

    def restart(self) -> None:
        # The same options again (pg_ctl keeps them), and the log: not our captured stdout.
        self._pg_ctl("-m", "fast", "-l", str(self.directory / "postgres.log"), "restart")

    @property
    def log(self) -> str:
        return (self.directory / "postgres.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A scratch PostgreSQL cluster; skipped where initdb/pg_ctl are missing or fail."""
    if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
        pytest.skip("initdb/pg_ctl are not installed")
    directory = Path(tempfile.mkdtemp(prefix="retinal-pg-"))  # /tmp: the postgres user's too
    cluster = PostgresCluster(directory, free_port())
    try:
        if os.geteuid() == 0:
            shutil.chown(directory, "postgres")
        cluster.create()
        cluster.start()
    except (OSError, LookupError, subprocess.SubprocessError) as error:
        shutil.rmtree(directory, ignore_errors=True)
        pytest.skip(f"no scratch PostgreSQL cluster: {error}")
    try:
        yield cluster
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


def reported_lesion_types() -> list[str]:
    """Short names of the lesion types the served model reports (its manifest says)."""
    from services.lesion.engine.detector import DEFAULT_WEIGHTS

    manifest = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    return list(manifest.get("reported_types", ["ma", "he", "ex", "se"]))
