"""The hostile-input corpus (tests/hostile_corpus.py) through a running gateway, and its file
cases through `retinal analyze`: every case gets its expected answer, no client error is a
5xx, nothing crashes, and the figures go to the reliability report (tests/reliability.py)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.gateway.tenants import digest, new_key
from services.language.facts import facts_from_findings
from services.language.grounding import GroundingChecker
from services.language.prompting import stated_texts
from shared.findings import Findings
from tests.conftest import REPO, Stack, fundus_png
from tests.hostile_corpus import (
    ANALYSED,
    BATCH_MAX_UPLOAD_MB,
    CASES,
    FILE_CATEGORIES,
    MAX_UPLOAD_MB,
    NAME_MARKER,
    PATIENT_IDENTIFIERS,
    Conversation,
    HostileCase,
    RawRequest,
    Upload,
)
from tests.reliability import record

pytestmark = pytest.mark.slow

OWN, OTHER = "clinic-a", "clinic-b"
KEYS = {OWN: new_key(), OTHER: new_key()}
FILE_CASES = [case for case in CASES if case.category in FILE_CATEGORIES]
TRACEBACK = "Traceback (most recent call last)"


@dataclass
class Tally:
    """What one surface (the gateway, the CLI) was given and how it answered."""

    tried: int = 0
    crashes: int = 0
    server_errors: int = 0
    unexpected: int = 0

    def count(self, *, unexpected: bool, server_error: bool = False, crashed: bool = False) -> None:
        self.tried += 1
        self.unexpected += unexpected
        self.server_errors += server_error
        self.crashes += crashed


TALLIES = {"gateway": Tally(), "cli": Tally()}


@dataclass(frozen=True)
class Analysis:
    id: str
    content_sha256: str
    findings: dict[str, Any]


@pytest.fixture(scope="module", autouse=True)
def _figures() -> Iterator[None]:
    """The module's counts, recorded once every case has run (failed ones included)."""
    yield
    gateway, cli = TALLIES["gateway"], TALLIES["cli"]
    for section, tally in (("inputs_gateway", gateway), ("inputs_cli", cli)):
        record(section, **vars(tally))
    record("inputs", **{key: vars(gateway)[key] + vars(cli)[key] for key in vars(gateway)})


@pytest.fixture(scope="module")
def hostile_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One stack for every case: two tenants, small caps (cheap to exceed), no rate limit in
    the way of a hundred requests a minute."""
    unlimited = "100000/minute"
    running = Stack(
        tmp_path_factory.mktemp("hostile"),
        extra_env={
            "RETINAL_GATEWAY_API_KEYS": ",".join(f"{t}:{digest(k)}" for t, k in KEYS.items()),
            "RETINAL_GATEWAY_MAX_UPLOAD_MB": str(MAX_UPLOAD_MB),
            "RETINAL_GATEWAY_BATCH_MAX_UPLOAD_MB": str(BATCH_MAX_UPLOAD_MB),
            "RETINAL_GATEWAY_RATE_LIMIT_ANALYSES": unlimited,
            "RETINAL_GATEWAY_RATE_LIMIT_REQUESTS": unlimited,
            "RETINAL_GATEWAY_RATE_LIMIT_CHATS": unlimited,
        },
    )
    try:
        running.start()
        yield running
    finally:
        running.stop()


def _client(stack: Stack, tenant: str) -> httpx.Client:
    return httpx.Client(
        base_url=stack.url, headers={"Authorization": f"Bearer {KEYS[tenant]}"}, timeout=300
    )


@pytest.fixture(scope="module")
def client(hostile_stack: Stack) -> Iterator[httpx.Client]:
    with _client(hostile_stack, OWN) as own:
        yield own


def _analyse(client: httpx.Client, png: bytes) -> Analysis:
    reply = client.post("/v1/analyses", files={"file": ("eye.png", png)})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    return Analysis(body["id"], hashlib.sha256(png).hexdigest(), body["findings"])


@pytest.fixture(scope="module")
def own_analysis(client: httpx.Client) -> Analysis:
    """The analysis the conversations of the corpus are about."""
    return _analyse(client, fundus_png())


@pytest.fixture(scope="module")
def other_analysis(hostile_stack: Stack) -> Analysis:
    """Another tenant's analysis, of another image: nothing of it may reach our answers."""
    with _client(hostile_stack, OTHER) as other:
        return _analyse(other, fundus_png(300))


def _send(client: httpx.Client, case: HostileCase, analysis_id: str) -> httpx.Response:
    send = case.send
    if isinstance(send, Upload):
        return client.post(send.path, files={send.field: (send.filename, send.content)})
    if isinstance(send, RawRequest):
        headers = {"Content-Type": send.content_type} if send.content_type else {}
        return client.request(send.method, send.path, content=send.body, headers=headers)
    messages = [{"role": role, "content": text} for role, text in send.messages]
    body = {"analysis_id": analysis_id, "messages": messages, "max_tokens": send.max_tokens}
    return client.post("/v1/chat", json={**body, "temperature": 0})


def _outcome_differences(case: HostileCase, reply: httpx.Response) -> list[str]:
    """How the answer differs from the case's expected one (empty: as expected)."""
    if reply.status_code != case.status:
        return [f"status {reply.status_code} (expected {case.status}): {reply.text[:300]}"]
    differences = []
    leaked = [value for value in PATIENT_IDENTIFIERS if value in reply.text]
    if leaked:
        differences.append(f"patient identifiers in the answer: {leaked}")
    body = reply.json()
    if case.code is not None:
        if not reply.headers["content-type"].startswith("application/problem+json"):
            differences.append(f"content type {reply.headers['content-type']}")
        problem = (body.get("status"), body.get("code"), body.get("type"))
        if problem != (case.status, case.code, f"/problems/{case.code}"):
            differences.append(f"problem {problem} (expected code {case.code})")
    if case.image_format is not None:
        found = body["findings"]
        image = (found["image"]["format"], found["image"]["bit_depth"], found["quality"]["grade"])
        expected = (case.image_format, case.bit_depth, case.grade)
        if any(want not in (None, got) for want, got in zip(expected, image, strict=True)):
            differences.append(f"image (format, bits, grade) {image}, expected {expected}")
    if case.status == 202:
        differences.extend(_batch_differences(case, body))
    return differences


def _batch_differences(case: HostileCase, status: dict[str, Any]) -> list[str]:
    """The batch's files against the case's members: refusals by name and code, counts."""
    refused = sorted((e["name"], e["state"], e["code"]) for e in status["errors"])
    expected = sorted((m.name, m.state, m.code) for m in case.members if m.state != "queued")
    counts = status["counts"]
    queued = sum(m.state == "queued" for m in case.members)
    differences = [] if refused == expected else [f"refused files {refused}, not {expected}"]
    if (counts["total"], counts["queued"]) != (len(case.members), queued):
        differences.append(f"counts {counts} (expected {len(case.members)}, {queued} queued)")
    return differences


def _answer_differences(answer: dict[str, Any], own: Analysis, other: Analysis) -> list[str]:
    """A chat answer must be about our analysis, state measured numbers only (so none of the
    other tenant's values either), and name nothing of the other tenant's."""
    differences = []
    if answer["analysis_id"] != own.id:
        differences.append(f"answer about {answer['analysis_id']}, not {own.id}")
    grounding = answer["grounding"]
    if grounding["unmatched"] != sum(not value["measured"] for value in grounding["values"]):
        differences.append(f"grounding report inconsistent: {grounding}")
    findings = Findings.model_validate(own.findings)
    checker = GroundingChecker(*facts_from_findings(findings), stated_texts(findings))
    unmeasured = [v.text for v in checker.check(answer["answer"]).values if not v.measured]
    if unmeasured:
        differences.append(f"unmeasured numbers delivered: {unmeasured} in {answer['answer']!r}")
    text = json.dumps(answer)
    for secret in (other.id, other.content_sha256):
        if secret in text:
            differences.append(f"the other tenant's {secret} is in the answer")
    return differences


def _stopped(stack: Stack) -> list[str]:
    return [
        name
        for name, service in stack.services.items()
        if service.process is None or service.process.poll() is not None
    ]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_the_gateway_answers_each_hostile_case_as_expected(
    case: HostileCase,
    hostile_stack: Stack,
    client: httpx.Client,
    own_analysis: Analysis,
    other_analysis: Analysis,
) -> None:
    reply = _send(client, case, own_analysis.id)
    differences = _outcome_differences(case, reply)
    if isinstance(case.send, Conversation) and reply.status_code == 200:
        differences.extend(_answer_differences(reply.json(), own_analysis, other_analysis))
    stopped = _stopped(hostile_stack)
    TALLIES["gateway"].count(
        unexpected=bool(differences),
        server_error=reply.status_code >= 500,
        crashed=bool(stopped),
    )
    assert not stopped, f"processes exited: {stopped}"
    assert reply.status_code < 500, reply.text
    assert differences == []
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_no_uploaded_file_name_became_a_path(hostile_stack: Stack) -> None:
    """Names such as ../../x.png are data: files are stored under generated names only."""
    assert not list(hostile_stack.tmp.rglob(f"*{NAME_MARKER}*"))
    assert not list(REPO.glob(f"*{NAME_MARKER}*"))


# --------------------------------------------------------------------------- the CLI


@dataclass(frozen=True)
class CliRun:
    returncode: int
    stderr: str
    records: dict[str, dict[str, Any]]  # by the file's path


def _retinal_analyze(paths: list[Path], output: Path, *options: str) -> CliRun:
    command = [sys.executable, "-m", "cli", "analyze", *map(str, paths), "--output", str(output)]
    done = subprocess.run(
        [*command, *options], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    lines = output.read_text().splitlines() if output.exists() else []
    records = {record["source"]: record for record in map(json.loads, lines)}
    return CliRun(done.returncode, done.stderr, records)


def _written(folder: Path, cases: list[HostileCase]) -> dict[str, Path]:
    """Each case's file, under its upload name, in a folder of its own."""
    paths = {}
    for case in cases:
        assert isinstance(case.send, Upload)
        path = folder / case.name / case.send.filename
        path.parent.mkdir(parents=True)
        path.write_bytes(case.send.content)
        paths[case.name] = path
    return paths


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _written(tmp_path_factory.mktemp("cli-files"), FILE_CASES)


@pytest.fixture(scope="module")
def cli_run(cli_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    """One `retinal analyze` over every file case (the models load once). Lesions are left
    out: the gateway runs them on the same files, and they would double the CLI's time."""
    output = tmp_path_factory.mktemp("cli") / "out.jsonl"
    run = _retinal_analyze(list(cli_files.values()), output, "--no-lesions")
    if TRACEBACK in run.stderr:
        TALLIES["cli"].crashes += 1
    return run


@pytest.mark.parametrize("case", FILE_CASES, ids=lambda case: case.name)
def test_the_cli_reports_each_hostile_file_and_goes_on(
    case: HostileCase, cli_run: CliRun, cli_files: dict[str, Path]
) -> None:
    found = cli_run.records.get(str(cli_files[case.name]))
    if found is None:
        outcome, grade = "no record", None
    elif "error" in found:
        outcome, grade = found["error"]["code"], None
    else:
        outcome, grade = ANALYSED, found["findings"]["quality"]["grade"]
    if case.grade is None:
        grade = None  # graded only where the case says how (what is no fundus photograph)
    leaked = found is not None and any(v in json.dumps(found) for v in PATIENT_IDENTIFIERS)
    unexpected = (outcome, grade) != (case.cli, case.grade) or leaked
    TALLIES["cli"].count(unexpected=unexpected)
    assert TRACEBACK not in cli_run.stderr, cli_run.stderr
    assert (outcome, grade) == (case.cli, case.grade)
    assert not leaked
    if found is not None and "error" in found:
        assert found["error"]["detail"]


def test_the_cli_summarises_and_exits_0_when_some_files_were_analysed(cli_run: CliRun) -> None:
    analysed = sum(case.cli == ANALYSED for case in FILE_CASES)
    assert cli_run.returncode == 0, cli_run.stderr
    assert f"{analysed} analysed, {len(FILE_CASES) - analysed} failed" in cli_run.stderr


def test_the_cli_exits_1_when_no_file_could_be_analysed(
    cli_files: dict[str, Path], tmp_path: Path
) -> None:
    refused = [cli_files[case.name] for case in FILE_CASES if case.cli != ANALYSED]
    run = _retinal_analyze(refused, tmp_path / "out.jsonl", "--no-lesions")
    assert TRACEBACK not in run.stderr, run.stderr
    assert run.returncode == 1
    assert len(run.records) == len(refused)
    assert all("error" in found for found in run.records.values())
