"""The embedded default: every service as a local process on this machine (CPU)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from services.gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)

# Start order: the backends first, the gateway (which probes them) last.
SERVICES = ("analysis", "lesion", "language", "worker", "gateway")


@dataclass
class LocalStack:
    log_dir: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def gateway_url(self) -> str:
        defaults = GatewaySettings.model_fields
        host = self.env.get("RETINAL_GATEWAY_HOST", defaults["host"].default)
        port = self.env.get("RETINAL_GATEWAY_PORT", defaults["port"].default)
        return f"http://{host}:{port}"

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for name in SERVICES:
            log = (self.log_dir / f"{name}.log").open("ab")
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout_s: float = 420.0) -> dict[str, str]:
        """Poll /readyz until every backend serves (the language model loads in about a minute on
        a CPU); raise with the last status otherwise."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, str] = {}
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                reply = httpx.get(f"{self.gateway_url}/readyz", timeout=2.0)
                last = reply.json().get("backends", {})
                if reply.status_code == 200:
                    return last
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the stack was not ready after {timeout_s:.0f} s: {last}")

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with status {process.returncode}; "
                    f"see {self.log_dir / (name + '.log')}"
                )

    def stop(self, grace_s: float = 15.0) -> None:
        for process in reversed(self.processes.values()):
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + grace_s
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
