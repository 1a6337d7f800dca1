"""Schemathesis (its CLI) against the live gateway's /openapi.json: no 5xx, responses that
match the documented schema, status codes and content types; its stateful phase follows the
links it finds between operations (a batch submitted, then read and cancelled). The
reliability bench runs ten times the examples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Stack
from tests.reliability import record, scaled

pytestmark = pytest.mark.slow

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)


def test_the_api_keeps_its_contract(stack: Stack, tmp_path: Path) -> None:
    schemathesis = Path(sys.executable).with_name("schemathesis")
    run = subprocess.run(
        [
            str(schemathesis),
            "run",
            f"{stack.url}/openapi.json",
            "--checks",
            ",".join(CHECKS),
            "--max-examples",
            str(scaled(30, 300)),
            "--phases",
            "examples,coverage,fuzzing,stateful",
            "--seed",
            "1",
            "--request-timeout",
            "60",
            "--report",
            "json",
            "--report-json-path",
            str(tmp_path / "run.json"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # its example cache stays out of the repository
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    cases = json.loads((tmp_path / "run.json").read_text())["test_cases"]
    record("schemathesis", cases=cases["generated"], failures=cases["with_failures"])
    assert cases["generated"] > 100 and cases["with_failures"] == 0, cases
