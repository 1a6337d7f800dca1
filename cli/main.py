"""The `retinal` command line."""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer

from cli.stack import LocalStack
from shared.logs import configure_logging

app = typer.Typer(add_completion=False, no_args_is_help=True, help="RetinalGPT command line.")

VAR = Path("var")


@app.callback()
def _commands() -> None:
    """RetinalGPT command line: run the stack, analyse images."""


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
    image, print its findings, and keep the API up until Ctrl-C."""
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


if __name__ == "__main__":
    app()
