"""`make loadtest`'s short form: a local stack under locust, no failed request, p95 in bounds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_the_short_load_test_passes_its_thresholds() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench.loadtest", "--short"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert '"POST /v1/analyses"' in run.stdout
