"""The README's run command: the whole stack as local processes, an example analysed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BACKENDS, free_port

pytestmark = pytest.mark.slow


def test_retinal_up_starts_every_service_and_prints_the_example_findings(tmp_path: Path) -> None:
    env = dict(os.environ)
    for name in BACKENDS:
        port = str(free_port())
        env[f"RETINAL_{name.upper()}_PORT"] = port
        env[f"RETINAL_GATEWAY_{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
        env[f"RETINAL_WORKER_{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
    env["RETINAL_GATEWAY_PORT"] = str(free_port())
    done = subprocess.run(
        [sys.executable, "-m", "cli", "up", "--exit-after-example"],
        cwd=tmp_path,  # var/ (logs, example image) goes here
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "all services ready" in done.stderr
    assert "RetinalGPT (retinalgpt-mini):" in done.stderr  # the assistant answered
    findings = json.loads(done.stdout)["findings"]
    assert findings["image"]["format"] == "PNG"
    assert findings["image"]["field_of_view"]["radius"] > 100
    assert {s["stage"] for s in findings["stages"]} >= {"analysis", "lesion", "quality"}
    assert findings["quality"]["grade"] in {"good", "usable", "reject"}
    logs = {p.stem for p in (tmp_path / "var" / "logs").glob("*.log")}
    assert logs == {"analysis", "lesion", "language", "worker", "gateway"}
