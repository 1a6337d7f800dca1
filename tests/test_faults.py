"""Faults injected into real processes (issue 10, item 3), each with its expected outcome.

The lesion service killed while requests are in flight, then restarted on its port; the
analysis service stalled (SIGSTOP) past the gateway's deadline; the Redis of the rate-limit
counters stalled and restarted; the PostgreSQL of the results store restarted and stopped
under load; the disk of the results store full. Expected: 503, 504 or 507
application/problem+json, never a 500 or a hang; every analysis or batch answered 2xx stored
exactly once; recovery with the same gateway process.

Proven elsewhere, so not repeated here: a worker killed, the broker restarted and a backend
down during a batch (tests/test_batches_faults.py); the language service busy (503
language-busy with Retry-After), down (503) or silent (504) (tests/test_gateway_chat.py).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import create_engine, text

from tests.conftest import (
    PostgresCluster,
    RedisServer,
    ServiceProcess,
    Stack,
    free_port,
    fundus_png,
    wait_until,
)
from tests.reliability import record, scaled
from tests.test_gateway import _is_problem

pytestmark = pytest.mark.slow

# The gateway's analysis deadline here: short, yet above an analysis on a loaded machine.
DEADLINE_S = 3.0
# What a timed-out request may take beyond it: the gateway's own work (ingestion, HTTP).
TIMEOUT_SLACK_S = 1.0
# What any request may take beyond it: the lesion call too, on a loaded machine.
SLACK_S = 4.0
DISK_KB = 1024  # the small filesystem of the disk-full test


@dataclass
class Gateway:
    process: ServiceProcess
    url: str

    def answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False


@dataclass
class Tally:
    """Every reply around one fault, and what was accepted: analysis id -> image hash,
    batch id -> image count."""

    replies: list[httpx.Response] = field(default_factory=list)
    analyses: dict[str, str] = field(default_factory=dict)
    batches: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def analyse(self, url: str, image: bytes) -> httpx.Response:
        reply = httpx.post(
            f"{url}/v1/analyses", files={"file": ("eye.png", image)}, timeout=DEADLINE_S * 4
        )
        with self.lock:
            self.replies.append(reply)
            if reply.status_code == 200:
                body = reply.json()
                self.analyses[body["id"]] = body["findings"]["image"]["content_sha256"]
        return reply

    def submit_batch(self, url: str, images: list[bytes]) -> httpx.Response:
        files = [("files", (f"eye-{i}.png", image)) for i, image in enumerate(images)]
        reply = httpx.post(f"{url}/v1/batches", files=files, timeout=DEADLINE_S * 4)
        with self.lock:
            self.replies.append(reply)
            if reply.status_code == 202:
                self.batches[reply.json()["id"]] = len(images)
        return reply

    @property
    def server_errors(self) -> int:
        return sum(reply.status_code == 500 for reply in self.replies)

    def refused(self) -> list[httpx.Response]:
        return [reply for reply in self.replies if reply.status_code not in (200, 202)]

    def lost(self, url: str) -> int:
        """Accepted analyses and batch images that cannot be read back as they were."""
        lost = 0
        for analysis_id, content_sha256 in self.analyses.items():
            reply = httpx.get(f"{url}/v1/analyses/{analysis_id}", timeout=30)
            found = reply.status_code == 200 and reply.json()["findings"]["image"]
            lost += not found or found["content_sha256"] != content_sha256
        for batch_id, images in self.batches.items():
            reply = httpx.get(f"{url}/v1/batches/{batch_id}", timeout=30)
            stored = sum(reply.json()["counts"].values()) if reply.status_code == 200 else 0
            lost += images - min(stored, images)
        return lost


def _duplicates(results_url: str) -> int:
    """Stored analyses beyond one per image (every test image is distinct)."""
    engine = create_engine(results_url)
    with engine.connect() as connection:
        stored = connection.execute(text("SELECT findings FROM analyses")).scalars().all()
    engine.dispose()
    images = Counter(json.loads(findings)["image"]["content_sha256"] for findings in stored)
    return sum(count - 1 for count in images.values())


def _serving(url: str, backend: str) -> bool:
    """The gateway's readiness sees `backend` SERVING (the language service is not run here)."""
    return httpx.get(f"{url}/readyz", timeout=10).json()["backends"][backend] == "SERVING"


def _record(tally: Tally, url: str, results_url: str, unrecovered: int) -> tuple[int, int]:
    """Count and record what the fault cost: (accepted work lost, duplicates)."""
    lost, duplicates = tally.lost(url), _duplicates(results_url)
    record(
        "faults",
        injected=1,
        accepted_lost=lost,
        duplicates=duplicates,
        server_errors_500=tally.server_errors,
        unrecovered=unrecovered,
    )
    return lost, duplicates


@contextlib.contextmanager
def _gateway(stack: Stack, name: str, **env: str) -> Iterator[Gateway]:
    """Another gateway process on the stack's backends, configured by `env`."""
    port = free_port()
    process = ServiceProcess(
        "gateway",
        {**stack.env, "RETINAL_GATEWAY_PORT": str(port), **env},
        stack.tmp / f"gateway-{name}.log",
    )
    gateway = Gateway(process, f"http://127.0.0.1:{port}")
    process.start()
    try:
        wait_until(gateway.answers, 30, f"the {name} gateway")
        yield gateway
    finally:
        process.stop()


@contextlib.contextmanager
def _steady_analyses(tally: Tally, url: str, first_size: int) -> Iterator[None]:
    """Analyses of distinct images one after another in a thread, until the block ends."""
    stop = threading.Event()

    def send() -> None:
        for size in itertools.count(first_size):
            if stop.is_set():
                return
            tally.analyse(url, fundus_png(size))

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        yield
    finally:
        stop.set()
        sender.join(timeout=DEADLINE_S * 4)


@pytest.fixture(scope="module")
def counters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer | None]:
    """The Redis of the gateway's rate-limit counters (None: no redis-server here)."""
    if shutil.which("redis-server") is None:
        yield None
        return
    server = RedisServer(free_port(), tmp_path_factory.mktemp("counters"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def faults_stack(
    tmp_path_factory: pytest.TempPathFactory, counters: RedisServer | None
) -> Iterator[Stack]:
    """The analysis and lesion services and a gateway with a short analysis deadline."""
    env = {"RETINAL_GATEWAY_ANALYSIS_DEADLINE_S": str(DEADLINE_S)}
    if counters is not None:
        env["RETINAL_GATEWAY_RATE_LIMIT_STORAGE"] = counters.url
    running = Stack(tmp_path_factory.mktemp("faults"), extra_env=env)
    try:
        running.start(backends=("analysis", "lesion"))
        yield running
    finally:
        running.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of DISK_KB, unmounted afterwards; skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", f"size={DISK_KB}k", "tmpfs", str(mount)]
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"cannot mount a small tmpfs: {error}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False, timeout=30)


def _fill(disk: Path) -> Path:
    """Write a file until the filesystem has no byte left."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as file:
        for chunk in (64 * 1024, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    file.write(b"\0" * chunk)
    with pytest.raises(OSError) as full:
        (disk / "probe").write_bytes(b"\0" * 4096)
    assert full.value.errno == errno.ENOSPC
    return filler


def test_a_backend_killed_in_flight_is_503_and_back_under_the_same_gateway(
    faults_stack: Stack,
) -> None:
    gateway = faults_stack.services["gateway"].process
    assert gateway is not None
    url, tally = faults_stack.url, Tally()
    images = [fundus_png(256 + i) for i in range(scaled(8, 32))]
    with ThreadPoolExecutor(len(images)) as pool:
        pending = [pool.submit(tally.analyse, url, image) for image in images]
        wait(pending, return_when=FIRST_COMPLETED)
        # The lesion service is the slower of the two: the others wait on it now.
        faults_stack.services["lesion"].stop(signal.SIGKILL)
        killed_at = time.monotonic()
        in_flight = [future.result() for future in pending]
        settled_s = time.monotonic() - killed_at
    faults_stack.start_backend("lesion")  # on the same port
    wait_until(lambda: _serving(url, "lesion"), 15, "the gateway to see lesion again")
    # The client's retry is safe: an image accepted before the kill is the same stored result.
    accepted_before = dict(tally.analyses)
    retried = [tally.analyse(url, image) for image in images]
    unrecovered = sum(reply.status_code != 200 for reply in retried)
    lost, duplicates = _record(
        tally, url, faults_stack.env["RETINAL_GATEWAY_RESULTS_URL"], unrecovered
    )

    failed = [reply for reply in in_flight if reply.status_code != 200]
    assert failed, "every request was answered before the kill: none was in flight"
    for reply in failed:
        _is_problem(reply, 503, "backend-unavailable")
        assert "lesion" in reply.json()["detail"]
        assert int(reply.headers["Retry-After"]) > 0
    assert settled_s < DEADLINE_S + SLACK_S  # nothing waits on the dead backend
    assert (unrecovered, lost, duplicates, tally.server_errors) == (0, 0, 0, 0)
    cached = {reply.json()["id"] for reply in retried if reply.json()["cached"]}
    assert cached == set(accepted_before)
    assert gateway.poll() is None  # the same gateway process throughout
    print(f"backend killed: {len(failed)} of {len(in_flight)} in flight refused with 503")


def test_a_stalled_backend_is_504_within_the_deadline_and_fine_once_resumed(
    faults_stack: Stack,
) -> None:
    analysis = faults_stack.services["analysis"].process
    assert analysis is not None
    url, tally = faults_stack.url, Tally()
    images = [fundus_png(320 + i) for i in range(scaled(3, 12))]
    os.kill(analysis.pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(len(images)) as pool:
            stalled = list(pool.map(lambda image: tally.analyse(url, image), images))
        readiness = httpx.get(f"{url}/readyz", timeout=10)
    finally:
        os.kill(analysis.pid, signal.SIGCONT)
    resumed = tally.analyse(url, fundus_png(319))
    unrecovered = int(resumed.status_code != 200)
    lost, duplicates = _record(
        tally, url, faults_stack.env["RETINAL_GATEWAY_RESULTS_URL"], unrecovered
    )

    for reply in stalled:
        _is_problem(reply, 504, "backend-timeout")
        assert "analysis" in reply.json()["detail"]
        assert reply.elapsed.total_seconds() < DEADLINE_S + TIMEOUT_SLACK_S
    _is_problem(readiness, 503, "not-ready")
    assert readiness.json()["backends"]["analysis"] == "DEADLINE_EXCEEDED"
    assert (unrecovered, lost, duplicates, tally.server_errors) == (0, 0, 0, 0)


def test_rate_limit_counters_stalled_or_down_serve_requests_uncounted(
    faults_stack: Stack, counters: RedisServer | None
) -> None:
    if counters is None:
        pytest.skip("redis-server is not installed")
    assert counters.process is not None
    url, tally = faults_stack.url, Tally()
    client = redis.Redis.from_url(counters.url)
    counted = tally.analyse(url, fundus_png(384))
    assert counted.status_code == 200, counted.text
    assert client.keys("LIMITS*"), "the counters are not in Redis"
    os.kill(counters.process.pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(tally.analyse, url, fundus_png(385))
            time.sleep(0.2)  # the analysis is waiting on the stalled counters now
            alive = httpx.get(f"{url}/healthz", timeout=10)
            stalled = waiting.result()
    finally:
        os.kill(counters.process.pid, signal.SIGCONT)
    counters.stop()  # no persistence: the counters are gone with it
    down = [tally.analyse(url, fundus_png(386 + i)) for i in range(scaled(3, 10))]
    read_while_down = httpx.get(f"{url}/v1/analyses/{counted.json()['id']}", timeout=30)
    counters.start()
    back = tally.analyse(url, fundus_png(383))
    unrecovered = int(back.status_code != 200 or not client.keys("LIMITS*"))
    lost, duplicates = _record(
        tally, url, faults_stack.env["RETINAL_GATEWAY_RESULTS_URL"], unrecovered
    )

    assert tally.refused() == [], [reply.text for reply in tally.refused()]
    assert read_while_down.status_code == 200, read_while_down.text
    # The stall costs the counter's timeouts (and redis-py's retries), not a hang.
    assert stalled.elapsed.total_seconds() < DEADLINE_S + SLACK_S
    # ...and holds only the requests that count: the gateway answers others meanwhile.
    assert alive.status_code == 200 and alive.elapsed.total_seconds() < 0.3
    assert max(reply.elapsed.total_seconds() for reply in down) < DEADLINE_S
    log = faults_stack.services["gateway"].log
    assert log.count("rate-limit counters unavailable") == 1  # once per outage
    assert "rate-limit counters available again" in log
    assert (unrecovered, lost, duplicates, tally.server_errors) == (0, 0, 0, 0)


def test_postgres_restarted_or_down_under_the_store_is_503_and_loses_nothing(
    faults_stack: Stack, postgres_cluster: PostgresCluster
) -> None:
    tally = Tally()
    with _gateway(
        faults_stack,
        "postgres",
        RETINAL_GATEWAY_RESULTS_URL=postgres_cluster.url,
        RETINAL_GATEWAY_RATE_LIMIT_STORAGE="memory://",
    ) as gateway:
        url = gateway.url

        def accepted(at_least: int) -> None:
            wait_until(lambda: len(tally.analyses) >= at_least, 60, f"{at_least} accepted")

        with _steady_analyses(tally, url, first_size=512):
            accepted(2)
            postgres_cluster.restart()  # fast: every connection of the gateway is cut
            accepted(len(tally.analyses) + 2)
            postgres_cluster.stop()
            try:
                some_id = next(iter(tally.analyses))
                read_while_down = httpx.get(f"{url}/v1/analyses/{some_id}", timeout=30)
                readiness = httpx.get(f"{url}/readyz", timeout=30)
                analysed_while_down = tally.analyse(url, fundus_png(500))
            finally:
                postgres_cluster.start()
            back = tally.analyse(url, fundus_png(501))  # right after the outage
            accepted(len(tally.analyses) + 2)
        unrecovered = int(back.status_code != 200)
        lost, duplicates = _record(tally, url, postgres_cluster.url, unrecovered)
        assert gateway.process.process is not None
        restarted = gateway.process.process.poll() is not None

    _is_problem(read_while_down, 503, "store-unavailable")
    _is_problem(analysed_while_down, 503, "store-unavailable")
    _is_problem(readiness, 503, "not-ready")
    assert readiness.json()["store"] == "unreachable"
    for reply in tally.refused():
        _is_problem(reply, 503, "store-unavailable")
        assert int(reply.headers["Retry-After"]) > 0
    assert not restarted
    assert (unrecovered, lost, duplicates, tally.server_errors) == (0, 0, 0, 0)
    print(f"postgres: {len(tally.analyses)} accepted, {len(tally.refused())} refused with 503")


def test_a_full_disk_under_the_store_is_507_and_corrupts_nothing(
    faults_stack: Stack, small_disk: Path
) -> None:
    tally = Tally()
    database = small_disk / "results.db"
    results_url = f"sqlite:///{database}"
    with _gateway(
        faults_stack,
        "small-disk",
        RETINAL_GATEWAY_RESULTS_URL=results_url,
        RETINAL_BATCH_DIR=str(small_disk / "batches"),
        RETINAL_GATEWAY_RATE_LIMIT_STORAGE="memory://",
    ) as gateway:
        url = gateway.url
        before = [tally.analyse(url, fundus_png(640 + i)) for i in range(2)]
        batch_before = tally.submit_batch(url, [fundus_png(650), fundus_png(651)])
        filler = _fill(small_disk)
        analysed_when_full = tally.analyse(url, fundus_png(660))
        batch_when_full = tally.submit_batch(url, [fundus_png(661)])
        lost_when_full = tally.lost(url)
        filler.unlink()  # space freed: no restart follows
        after = tally.analyse(url, fundus_png(670))
        batch_after = tally.submit_batch(url, [fundus_png(671)])
        unrecovered = int(after.status_code != 200 or batch_after.status_code != 202)
        lost, duplicates = _record(tally, url, results_url, unrecovered)
    with contextlib.closing(sqlite3.connect(database)) as connection:
        integrity = connection.execute("PRAGMA integrity_check").fetchone()[0]

    assert [reply.status_code for reply in before] == [200, 200]
    assert batch_before.status_code == 202, batch_before.text
    for reply in (analysed_when_full, batch_when_full):
        _is_problem(reply, 507, "storage-full")
        assert "nothing of this request was stored" in reply.json()["detail"]
    assert lost_when_full == 0  # what was stored before still reads back
    assert integrity == "ok"
    # The refused batch left no folder behind; the accepted ones kept theirs.
    assert sorted(path.name for path in (small_disk / "batches").iterdir()) == sorted(tally.batches)
    assert (unrecovered, lost, duplicates, tally.server_errors) == (0, 0, 0, 0)
