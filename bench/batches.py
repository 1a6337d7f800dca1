"""Batch throughput: images per minute with 1 and 2 Celery workers on this machine.

    python -m bench.batches [--drive N] [--large N]   -> bench/results/batches.json

One local stack (the analysis and lesion services, the gateway and the workers as processes
on free ports, its own redis-server as broker) serves every run. Each run submits one batch
through POST /v1/batches and times it from the upload to its final state: DRIVE test
photographs (565x584) and Drishti-GS1 photographs (2045x1752, "2000 px"). Each run is
another tenant's, so no result is reused from an earlier run. Skips (exit 0, a message)
when ../shared/datasets is absent or redis-server is missing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from bench.loadtest import DATASETS, free_port, stack_env
from services.gateway.tenants import digest, new_key
from shared.healthcheck import grpc_serving

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "batches.json"
SETS = {
    "drive": ("DRIVE test photographs, 565x584 TIFF", DATASETS / "DRIVE/test/images"),
    "large": ("Drishti-GS1 photographs, 2045x1752 JPEG", DATASETS / "Drishti-GS1/Training/Images"),
}
FINAL = {"completed", "completed_with_errors", "cancelled"}


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    server = subprocess.Popen([*command, "--dir", str(folder)], stdout=subprocess.DEVNULL)
    return server, f"redis://127.0.0.1:{port}/0"


def start(name: str, env: dict[str, str], logs: Path) -> subprocess.Popen[bytes]:
    logs.mkdir(parents=True, exist_ok=True)
    log = (logs / f"{name}.log").open("ab")
    module = name.split("-")[0]
    command = [sys.executable, "-m", f"services.{module}"]
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait(ready: Callable[[], bool], process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 120
    while not ready():
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.2)


def gateway_up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def start_stack(env: dict[str, str], logs: Path) -> dict[str, subprocess.Popen[bytes]]:
    """What a batch needs: the analysis and lesion services, the gateway, one worker."""
    processes = {name: start(name, env, logs) for name in ("analysis", "lesion", "gateway")}
    for name in ("analysis", "lesion"):
        address = env[f"RETINAL_GATEWAY_{name.upper()}_ADDR"]
        wait(lambda a=address: grpc_serving(a), processes[name], name)
    url = f"http://127.0.0.1:{env['RETINAL_GATEWAY_PORT']}"
    wait(lambda: gateway_up(url), processes["gateway"], "the gateway")
    processes["worker-1"] = start_worker(env, logs, 1)
    return processes


def start_worker(env: dict[str, str], logs: Path, number: int) -> subprocess.Popen[bytes]:
    worker = start(f"worker-{number}", env, logs)
    log = logs / f"worker-{number}.log"
    wait(lambda: "ready" in log.read_text(errors="replace"), worker, "a worker")
    return worker


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_batch(url: str, key: str, files: list[Path]) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {key}"}
    started = time.monotonic()
    reply = httpx.post(
        f"{url}/v1/batches",
        files=[("files", (path.name, path.read_bytes())) for path in files],
        headers=headers,
        timeout=300,
    )
    reply.raise_for_status()
    batch_id = reply.json()["id"]
    while True:
        status = httpx.get(f"{url}/v1/batches/{batch_id}", headers=headers, timeout=30).json()
        if status["state"] in FINAL:
            break
        time.sleep(0.25)
    seconds = time.monotonic() - started
    return {
        "images": len(files),
        "seconds": round(seconds, 1),
        "images_per_minute": round(len(files) / seconds * 60, 1),
        "state": status["state"],
        "done": status["counts"]["done"],
        "failed": status["counts"]["failed"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drive", type=int, default=20, help="DRIVE images per run")
    parser.add_argument("--large", type=int, default=10, help="2000-px images per run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    counts = {"drive": args.drive, "large": args.large}
    if not all(folder.is_dir() for _, folder in SETS.values()):
        print(f"skipped: no datasets at {DATASETS}")
        return 0
    if shutil.which("redis-server") is None:
        print("skipped: redis-server is not installed")
        return 0
    tenants = {f"run-{i}": new_key() for i in range(5)}
    with tempfile.TemporaryDirectory(prefix="retinal-batches-") as tmp:
        folder = Path(tmp)
        redis, redis_url = start_redis(folder)
        env = {
            **stack_env(folder),
            "REDIS_URL": redis_url,
            "RETINAL_BATCH_DIR": str(folder / "batches"),
            "RETINAL_GATEWAY_API_KEYS": ",".join(f"{t}:{digest(k)}" for t, k in tenants.items()),
        }
        processes = start_stack(env, folder / "logs")
        extra = None
        try:
            url = f"http://127.0.0.1:{env['RETINAL_GATEWAY_PORT']}"
            keys = iter(tenants.values())
            drive = sorted(SETS["drive"][1].iterdir())
            run_batch(url, next(keys), drive[:2])  # warm-up: every model's first call
            load_before = os.getloadavg()
            runs = []
            for name, (description, images_folder) in SETS.items():
                files = sorted(images_folder.iterdir())[: counts[name]]
                for workers in (1, 2):
                    if workers == 2 and extra is None:
                        extra = start_worker(env, folder / "logs", 2)
                    result = {"set": description, "workers": workers}
                    result.update(run_batch(url, next(keys), files))
                    runs.append(result)
                    print(json.dumps(result), flush=True)
                if extra is not None:
                    stop(extra)
                    extra = None
            load_after = os.getloadavg()
        finally:
            for process in [*([extra] if extra else []), *reversed(processes.values()), redis]:
                stop(process)
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average_before_and_after": [load_before, load_after],
        "what": "POST /v1/batches (multipart) to final state; Celery workers on Redis, each "
        "image through the analysis and lesion services (gRPC, both on this machine)",
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
