"""Abuse of the API over a full running stack (issue 10): broken object-level authorization
(OWASP API1) on every object endpoint, missing and wrong keys on every endpoint, and no
secrets or patient identifiers in any service's log.

The endpoints are read from the gateway's own OpenAPI document, so a new route is tested as
soon as it exists; a route with a path parameter this module does not know fails the test
until it is taught how to address that route's objects.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.batching import FINAL, KEYS, BatchStack, auth
from tests.conftest import fundus_png, wait_until
from tests.reliability import record
from tests.test_gateway import _is_problem
from tests.test_ingestion import dicom, fundus

pytestmark = pytest.mark.slow

# What a careless service could write to its log: the patient's identity (the DICOM header and
# a file name made of it), a clinician's question, and the API keys themselves.
PATIENT_NAME, PATIENT_ID, BIRTH_DATE = "Doe^Jane", "PID-SECRET-42", "19610203"
FILE_NAME = "Doe_Jane_19610203_OD.dcm"
QUESTION = "Jane Doe, born 1961-02-03, asks: is her optic disc cupped?"
PUBLIC = {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/redoc", "/"}


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatchStack]:
    """Every process: Redis, the three backends, the gateway (two tenants) and a worker."""
    running = BatchStack(tmp_path_factory.mktemp("abuse"))
    try:
        running.start()
        running.stack.start_backend("language")
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def owned(full: BatchStack) -> dict[str, str]:
    """clinic-a's objects, every kind the API has: an analysis of a DICOM study carrying a
    patient's identity, its overlay, and a finished batch."""
    url = full.stack.url
    analysed = httpx.post(
        f"{url}/v1/analyses",
        files={"file": (FILE_NAME, dicom(fundus(), PatientBirthDate=BIRTH_DATE))},
        data={"overlays": "lesions"},
        headers=auth("clinic-a"),
        timeout=120,
    )
    assert analysed.status_code == 200, analysed.text
    submitted = httpx.post(
        f"{url}/v1/batches",
        files=[("files", (FILE_NAME.replace(".dcm", ".png"), fundus_png()))],
        headers=auth("clinic-a"),
        timeout=60,
    )
    assert submitted.status_code == 202, submitted.text
    batch_id = submitted.json()["id"]

    def finished() -> bool:
        reply = httpx.get(f"{url}/v1/batches/{batch_id}", headers=auth("clinic-a"))
        return reply.json()["state"] in FINAL

    wait_until(finished, 120, "clinic-a's batch")
    return {"analysis_id": analysed.json()["id"], "batch_id": batch_id, "layer": "lesions"}


def _operations(url: str) -> list[tuple[str, str]]:
    """(method, path template) of every API operation the gateway documents."""
    document = httpx.get(f"{url}/openapi.json").json()
    return sorted(
        (method.upper(), path)
        for path, item in document["paths"].items()
        if path not in PUBLIC
        for method in item
        if method in {"get", "post", "put", "patch", "delete"}
    )


def _fill(template: str, values: dict[str, str]) -> str:
    unknown = set(re.findall(r"{(\w+)}", template)) - set(values)
    assert not unknown, f"{template}: teach this module to address {sorted(unknown)}"
    return re.sub(r"{(\w+)}", lambda match: values[match.group(1)], template)


def _record_attempts(section: str, replies: list[httpx.Response]) -> None:
    """Attempts that should all fail, and how many did not (an answer under 400)."""
    record(section, attempts=len(replies), successes=sum(r.status_code < 400 for r in replies))


def test_every_api_operation_refuses_a_missing_or_wrong_key(
    full: BatchStack, owned: dict[str, str]
) -> None:
    url = full.stack.url
    operations = _operations(url)
    assert len(operations) >= 10, operations  # the document was read, not an empty one
    wrong = (
        {},
        {"Authorization": "Bearer rgpt_not-a-key"},
        {"Authorization": f"Basic {KEYS['clinic-a']}"},  # a real key under the wrong scheme
        {"Authorization": f"Bearer {KEYS['clinic-a']}x"},
        {"Authorization": "Bearer"},
    )
    replies = [
        httpx.request(method, f"{url}{_fill(template, owned)}", headers=headers)
        for method, template in operations
        for headers in wrong
    ]
    _record_attempts("authentication", replies)
    for reply in replies:
        _is_problem(reply, 401, "unauthorized")


def test_no_tenant_reaches_another_tenants_objects(full: BatchStack, owned: dict[str, str]) -> None:
    """clinic-b, with a valid key of its own, addresses clinic-a's objects by their ids on
    every operation that takes an id, as written and percent-encoded (decoded to the same id
    by the server): each answer is the 404 of an id that does not exist, and clinic-a's
    objects are untouched afterwards."""
    url = full.stack.url
    by_id = [(m, t) for m, t in _operations(url) if "{" in t]
    assert {t for _, t in by_id} >= {"/v1/analyses/{analysis_id}", "/v1/batches/{batch_id}"}
    encoded = {name: "".join(f"%{ord(c):02X}" for c in value) for name, value in owned.items()}
    as_owner = httpx.get(f"{url}/v1/analyses/{encoded['analysis_id']}", headers=auth("clinic-a"))
    assert as_owner.status_code == 200  # the encoded id is the same id to the server
    replies = [
        httpx.request(method, f"{url}{_fill(template, ids)}", headers=auth("clinic-b"))
        for method, template in by_id
        for ids in (owned, encoded)
    ]
    # Ids in bodies: a chat, plain and OpenAI-shaped, about clinic-a's analysis.
    question = [{"role": "user", "content": "What is the cup-to-disc ratio?"}]
    for path in ("/v1/chat", "/v1/chat/completions"):
        body = {"analysis_id": owned["analysis_id"], "messages": question, "max_tokens": 8}
        if path.endswith("completions"):
            body["model"] = "retinalgpt"
        replies.append(httpx.post(f"{url}{path}", json=body, headers=auth("clinic-b"), timeout=120))
    _record_attempts("cross_tenant", replies)
    for reply in replies:
        _is_problem(reply, 404, "not-found")

    analysis = httpx.get(f"{url}/v1/analyses/{owned['analysis_id']}", headers=auth("clinic-a"))
    batch = httpx.get(f"{url}/v1/batches/{owned['batch_id']}", headers=auth("clinic-a"))
    assert analysis.status_code == batch.status_code == 200
    assert batch.json()["state"] == "completed"  # clinic-b's DELETE cancelled nothing


def test_no_secret_or_patient_identifier_reaches_any_log(
    full: BatchStack, owned: dict[str, str], tmp_path: Path
) -> None:
    """After a full run (DICOM analysis, batch, a chat naming the patient, refused keys), the
    logs of every process hold none of the keys and none of the patient's identifiers."""
    url = full.stack.url
    chat = httpx.post(
        f"{url}/v1/chat",
        json={
            "analysis_id": owned["analysis_id"],
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 8,
        },
        headers={**auth("clinic-a"), "X-Request-ID": "abuse-log-scan"},
        timeout=120,
    )
    assert chat.status_code == 200, chat.text
    processes = [*full.stack.services.values(), *full.workers]
    logs = {process.name: process.log for process in processes}
    assert "abuse-log-scan" in logs["gateway"]  # the chat was logged, by its request id
    secrets = {
        **{f"{tenant}'s key": key for tenant, key in KEYS.items()},
        "patient name": PATIENT_NAME,
        "patient name (file)": "Doe_Jane",
        "patient id": PATIENT_ID,
        "birth date": BIRTH_DATE,
        "the question": "born 1961-02-03",
    }
    found = [
        f"{what} in the {name} log"
        for name, log in logs.items()
        for what, secret in secrets.items()
        if secret in log
    ]
    lines = sum(log.count("\n") for log in logs.values())
    record("log_scan", processes=len(logs), lines=lines, secrets_found=len(found))
    assert lines > 50 and not found, found
