"""`retinal batch submit|status|results|cancel`: batches on a running gateway."""

from __future__ import annotations

import json
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from tqdm import tqdm

from cli.analyze import CsvOutput, JsonlOutput, expand

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Batches on a running gateway: submit images, follow progress, fetch the tables.",
)

FINAL_STATES = {"completed", "completed_with_errors", "cancelled"}

Url = Annotated[
    str, typer.Option(envvar="RETINAL_URL", help="The gateway (default: the local one)")
]
ApiKey = Annotated[
    str | None, typer.Option(envvar="RETINAL_API_KEY", help="The tenant's API key, if needed")
]
BatchId = Annotated[str, typer.Argument(help="The id `retinal batch submit` printed")]
DEFAULT_URL = "http://127.0.0.1:8000"


def _client(url: str, api_key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(60, read=600))


def _checked(reply: httpx.Response) -> httpx.Response:
    if reply.is_error:
        reply.read()
        typer.echo(f"{reply.status_code}: {reply.text}", err=True)
        raise typer.Exit(1)
    return reply


def _archive_members(paths: list[Path]) -> Iterator[tuple[Path, str]]:
    """(file, name in the archive): a folder's files keep their path below its parent."""
    for path in paths:
        root = path.parent if path.is_dir() else None
        for file in expand([path]):
            yield file, str(file.relative_to(root)) if root is not None else file.name


def _follow(client: httpx.Client, batch_id: str) -> dict[str, Any]:
    """A progress bar until the batch is final; its last status."""
    status = _checked(client.get(f"/v1/batches/{batch_id}")).json()
    counts = status["counts"]
    with tqdm(total=counts["total"], desc="batch", unit="img", file=sys.stderr) as bar:
        while True:
            counts = status["counts"]
            bar.update(counts["total"] - counts["pending"] - bar.n)
            bar.set_postfix(done=counts["done"], failed=counts["failed"] + counts["skipped"])
            if status["state"] in FINAL_STATES:
                return status
            time.sleep(1.0)
            status = _checked(client.get(f"/v1/batches/{batch_id}")).json()


def _summary(status: dict[str, Any]) -> None:
    counts = status["counts"]
    typer.echo(
        f"{status['id']}: {status['state']}; {counts['done']} done, {counts['failed']} failed, "
        f"{counts['skipped']} skipped, {counts['cancelled']} cancelled, "
        f"{counts['pending']} pending",
        err=True,
    )


@app.command()
def submit(
    paths: Annotated[
        list[Path], typer.Argument(exists=True, help="Image files, folders, or one zip")
    ],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    pixel_size_um: Annotated[
        float | None, typer.Option(min=0.01, help="Micrometres per pixel, when known")
    ] = None,
    overlays: Annotated[
        str | None, typer.Option(help="Comma-separated overlay layers to render")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Follow the batch with a progress bar")] = False,
) -> None:
    """Send images as one batch (folders are zipped on the way); prints the batch id."""
    data = {
        key: value
        for key, value in {"pixel_size_um": pixel_size_um, "overlays": overlays}.items()
        if value is not None
    }
    with tempfile.TemporaryFile() as bundle, _client(url, api_key) as client:
        if len(paths) == 1 and zipfile.is_zipfile(paths[0]):
            upload = paths[0].open("rb")
        else:
            # Stored, not compressed: photographs are compressed already.
            with zipfile.ZipFile(bundle, "w", zipfile.ZIP_STORED) as archive:
                for file, name in _archive_members(paths):
                    archive.write(file, name)
            bundle.seek(0)
            upload = bundle
        with upload:
            reply = client.post(
                "/v1/batches",
                files={"files": ("batch.zip", upload, "application/zip")},
                data=data,
            )
        status = _checked(reply).json()
        typer.echo(status["id"])
        if wait:
            status = _follow(client, status["id"])
        _summary(status)


@app.command()
def status(
    batch_id: BatchId,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    wait: Annotated[bool, typer.Option(help="Follow the batch with a progress bar")] = False,
) -> None:
    """A batch's state, counts and per-image errors (JSON)."""
    with _client(url, api_key) as client:
        found = (
            _follow(client, batch_id)
            if wait
            else _checked(client.get(f"/v1/batches/{batch_id}")).json()
        )
    typer.echo(json.dumps(found, indent=2))


def _download(client: httpx.Client, path: str, target: Path | None) -> None:
    with client.stream("GET", path) as reply:
        _checked(reply)
        if target is None:
            for chunk in reply.iter_text():
                sys.stdout.write(chunk)
            return
        with target.open("wb") as handle:
            for chunk in reply.iter_bytes():
                handle.write(chunk)


@app.command()
def results(
    batch_id: BatchId,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    output: JsonlOutput = None,
    csv_path: CsvOutput = None,
) -> None:
    """A batch's results: JSON Lines (one image a line) and optionally the CSV table."""
    with _client(url, api_key) as client:
        _download(client, f"/v1/batches/{batch_id}/results.jsonl", output)
        if csv_path is not None:
            _download(client, f"/v1/batches/{batch_id}/results.csv", csv_path)


@app.command()
def cancel(batch_id: BatchId, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Cancel what has not started."""
    with _client(url, api_key) as client:
        _summary(_checked(client.delete(f"/v1/batches/{batch_id}")).json())
