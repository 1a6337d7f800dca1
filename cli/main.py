"""The `retinal` command line."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import httpx
import numpy as np
import typer
from PIL import Image

from cli import analyze as analysis_cli
from cli import batch
from cli.analyze import CsvOutput, JsonlOutput
from cli.stack import LocalStack
from services.analysis.settings import AnalysisSettings
from shared import tables
from shared.logs import configure_logging

app = typer.Typer(add_completion=False, no_args_is_help=True, help="RetinalGPT command line.")
app.add_typer(batch.app, name="batch")

VAR = Path("var")


@app.callback()
def _commands() -> None:
    """RetinalGPT command line: run the stack, analyse images, run batches."""


def _example_image() -> Path:
    """A synthetic fundus drawn by the project's generator (no patient data in the repo)."""
    from PIL import Image

    from shared.synthetic import DEMO_LESION_COUNTS, SyntheticFundusSpec, generate_fundus

    path = VAR / "example_fundus.png"
    if not path.exists():
        VAR.mkdir(exist_ok=True)
        spec = SyntheticFundusSpec(lesion_counts=DEMO_LESION_COUNTS)
        Image.fromarray(generate_fundus(spec, seed=0).rgb).save(path)
    return path


EXAMPLE_QUESTION = "Summarise this image's findings: quality, vessels, optic disc and lesions."


def _ask_about(gateway_url: str, analysis_id: str) -> None:
    """One question to the assistant about the analysed example; its grounded answer on
    stderr (stdout keeps the findings document alone)."""
    reply = httpx.post(
        f"{gateway_url}/v1/chat",
        json={
            "analysis_id": analysis_id,
            "messages": [{"role": "user", "content": EXAMPLE_QUESTION}],
            "max_tokens": 96,
        },
        timeout=300.0,
    )
    if not reply.is_success:
        typer.echo(f"the assistant did not answer: {reply.text}", err=True)
        raise typer.Exit(1)
    answer = reply.json()
    grounding = answer["grounding"]
    typer.echo(
        f"\nYou: {EXAMPLE_QUESTION}\nRetinalGPT ({answer['model']}): {answer['answer']}", err=True
    )
    typer.echo(
        f"(grounding: {len(grounding['values'])} values checked, {grounding['unmatched']} "
        "unmeasured and repaired)\n",
        err=True,
    )


@app.command()
def up(
    image: Annotated[
        Path | None, typer.Option(help="Image to analyse once the stack is ready")
    ] = None,
    exit_after_example: Annotated[
        bool, typer.Option(help="Stop the stack after printing the example's findings")
    ] = False,
) -> None:
    """Run every service as a local process (the embedded CPU default), analyse an example
    image, print its findings, ask the assistant about it, and keep the API up until Ctrl-C."""
    configure_logging("launcher")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stack = LocalStack(log_dir=VAR / "logs")
    stop = False

    def _request_stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _request_stop)
    stack.start()
    try:
        statuses = stack.wait_ready()
        typer.echo(f"all services ready: {statuses}; logs in {stack.log_dir}/", err=True)
        example = image or _example_image()
        with example.open("rb") as handle:
            reply = httpx.post(
                f"{stack.gateway_url}/v1/analyses",
                files={"file": (example.name, handle)},
                timeout=300.0,
            )
        typer.echo(json.dumps(reply.json(), indent=2))
        if not reply.is_success:
            raise typer.Exit(1)
        _ask_about(stack.gateway_url, reply.json()["id"])
        if exit_after_example:
            return
        typer.echo(
            f"API up at {stack.gateway_url} (docs: {stack.gateway_url}/docs); Ctrl-C stops it.",
            err=True,
        )
        while not stop:
            stack.check_alive()
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        typer.echo("stopping the stack", err=True)
        stack.stop()


@app.command()
def analyze(
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders", exists=True)],
    output: JsonlOutput = None,
    csv_path: CsvOutput = None,
    save_masks: Annotated[
        Path | None, typer.Option(help="Write <stem>_<layer>.png masks, input-sized, here")
    ] = None,
    weights_dir: Annotated[
        Path | None, typer.Option(help="Model weights and manifests (default: the service's)")
    ] = None,
    lesions: Annotated[
        bool, typer.Option(help="Detect lesions (MA, HE, EX, SE) and assess the image")
    ] = True,
    lesion_weights: Annotated[
        Path | None, typer.Option(help="Lesion model weights (default: the lesion service's)")
    ] = None,
) -> None:
    """Analyse fundus photographs in-process: findings per image, a CSV, optional masks."""
    from services.analysis.engine.analyzer import Analyzer
    from services.lesion.engine.detector import LesionDetector
    from services.lesion.settings import LesionSettings

    files = list(analysis_cli.expand(paths))
    analysis_settings = AnalysisSettings()
    analyzer = Analyzer.load(
        weights_dir or analysis_settings.weights_dir,
        vessel_mirror_average=analysis_settings.vessel_mirror_average,
        vessel_precision=analysis_settings.vessel_precision,
    )
    detector = None
    if lesions:
        lesion_settings = LesionSettings()
        detector = LesionDetector.load(
            lesion_weights or lesion_settings.weights,
            precision=lesion_settings.precision,
            test_time_scales=lesion_settings.test_time_scales,
        )
    with contextlib.ExitStack() as stack:
        jsonl = stack.enter_context(output.open("w")) if output else sys.stdout
        table = None
        if csv_path is not None:
            handle = stack.enter_context(csv_path.open("w", newline=""))
            table = csv.DictWriter(handle, fieldnames=tables.CSV_COLUMNS)
            table.writeheader()
        outputs = analysis_cli.Outputs(jsonl=jsonl, table=table, masks=save_masks)
        done, failed = analysis_cli.analyze_files(files, analyzer, detector, outputs)
    typer.echo(f"{done} analysed, {failed} failed", err=True)
    if failed and not done:
        raise typer.Exit(1)


def _read_mask(path: Path | None) -> np.ndarray | None:
    if path is None:
        return None
    return np.asarray(Image.open(path).convert("L")) >= 128


@app.command()
def features(
    vessel_mask: Annotated[Path, typer.Option(exists=True, help="Binary vessel mask")],
    artery_mask: Annotated[Path | None, typer.Option(exists=True)] = None,
    vein_mask: Annotated[Path | None, typer.Option(exists=True)] = None,
    disc_mask: Annotated[Path | None, typer.Option(exists=True)] = None,
    cup_mask: Annotated[Path | None, typer.Option(exists=True)] = None,
    pixel_size_um: Annotated[
        float | None, typer.Option(min=0.01, help="Micrometres per mask pixel, when known")
    ] = None,
) -> None:
    """The features of given masks (ours or anyone's), as JSON with AutoMorph's columns."""
    from services.analysis.features import MaskSet, measure

    try:
        masks = MaskSet(
            vessel=_read_mask(vessel_mask),
            artery=_read_mask(artery_mask),
            vein=_read_mask(vein_mask),
            disc=_read_mask(disc_mask),
            cup=_read_mask(cup_mask),
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    measured = measure(masks, pixel_size_um=pixel_size_um)
    typer.echo(
        json.dumps(
            {
                "vessels": measured.vessels.model_dump(mode="json", exclude_none=True),
                "disc": measured.disc.model_dump(mode="json", exclude_none=True),
                "columns": measured.columns(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    app()


@app.command("api-key")
def api_key(
    tenant: Annotated[str, typer.Argument(help="The tenant the key will belong to")],
) -> None:
    """Make a new API key: give the key to the tenant, the digest line to the gateway."""
    from services.gateway.tenants import digest, load_keys, new_key

    key = new_key()
    entry = f"{tenant}:{digest(key)}"
    try:
        load_keys(entry, None)  # the same checks the gateway makes at start
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="TENANT") from error
    typer.echo(f"key (shown once): {key}")
    typer.echo(f"RETINAL_GATEWAY_API_KEYS entry: {entry}")
