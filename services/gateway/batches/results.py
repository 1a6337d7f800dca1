"""A batch's results as JSON Lines (one findings document per image) and as CSV (AutoMorph's
columns, as `retinal analyze --csv` writes them), streamed row by row."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator

from services.gateway.store import ImageResult, ResultsStore
from shared import tables


def _record(image: ImageResult) -> dict[str, object]:
    record: dict[str, object] = {
        "position": image.position,
        "source": image.name,
        "state": image.state.value,
        "content_sha256": image.content_sha256,
    }
    if image.analysis_id is not None:
        record["analysis_id"] = image.analysis_id
    if image.error_code is not None:
        record["error"] = {"code": image.error_code, "detail": image.error_detail}
    if image.findings is not None:
        record["findings"] = image.findings.model_dump(mode="json", exclude_none=True)
    return record


def jsonl(store: ResultsStore, batch_id: str) -> Iterator[str]:
    for image in store.batch_results(batch_id):
        yield json.dumps(_record(image)) + "\n"


def csv_rows(store: ResultsStore, batch_id: str) -> Iterator[str]:
    buffer = io.StringIO()
    table = csv.DictWriter(buffer, fieldnames=tables.CSV_COLUMNS)
    table.writeheader()
    yield buffer.getvalue()
    for image in store.batch_results(batch_id):
        row: dict[str, object] = {"source": image.name}
        if image.findings is not None:
            row.update(tables.row(image.findings))
        else:  # not analysed: its reason, or its state (queued, running, cancelled)
            row["error"] = image.error_code or image.state.value
        buffer.seek(0)
        buffer.truncate()
        table.writerow(row)
        yield buffer.getvalue()
