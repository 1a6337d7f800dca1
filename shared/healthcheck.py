"""Container health probes: `python -m shared.healthcheck grpc HOST:PORT` or `http URL`.

Exit status 0 when healthy, 1 otherwise (Docker and Kubernetes exec probes).
"""

from __future__ import annotations

import sys

import grpc
import httpx
import typer
from grpc_health.v1 import health_pb2, health_pb2_grpc

cli = typer.Typer(add_completion=False, help=__doc__)


def grpc_serving(address: str, service: str = "", timeout_s: float = 2.0) -> bool:
    """True when the server at `address` reports SERVING for `service` ("" = the server)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@cli.command("grpc")
def grpc_probe(address: str, service: str = "", timeout_s: float = 2.0) -> None:
    """Check a gRPC server through grpc.health.v1."""
    sys.exit(0 if grpc_serving(address, service, timeout_s) else 1)


@cli.command("http")
def http_probe(url: str, timeout_s: float = 2.0) -> None:
    """Check that an HTTP endpoint answers 2xx."""
    try:
        ok = httpx.get(url, timeout=timeout_s).is_success
    except httpx.HTTPError:
        ok = False
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    cli()
