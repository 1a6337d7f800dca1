"""Bootstrap shared by the gRPC services: limits, health, reflection, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from shared.config import GrpcServiceSettings
from shared.logs import configure_logging
from shared.telemetry import TelemetryInterceptor

logger = logging.getLogger(__name__)

# Adds the service's servicers to the server and returns their full service names.
Registrar = Callable[[grpc.aio.Server], Sequence[str]]


class Lifecycle(Protocol):
    """What a service starts after it listens (e.g. a model server) and stops on shutdown."""

    start: Callable[[], Awaitable[None]]
    close: Callable[[], Awaitable[None]]


def message_size_options(max_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
    ]


def client_options(max_bytes: int) -> list[tuple[str, int | str]]:
    """Channel options of the services' clients (gateway, worker).

    round_robin spreads calls over every address a name resolves to (a headless Kubernetes
    Service gives one per pod); short reconnect backoff finds a restarted backend quickly.
    """
    return [
        *message_size_options(max_bytes),
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


async def serve(
    settings: GrpcServiceSettings,
    name: str,
    register: Registrar,
    lifecycle: Lifecycle | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain in-flight calls for `shutdown_grace_s`.

    With a `lifecycle`, health says NOT_SERVING until its start() has finished.
    """
    server = grpc.aio.server(
        options=message_size_options(settings.max_message_bytes),
        interceptors=[TelemetryInterceptor(name)],
    )
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.host)
    service_names = list(register(server))

    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection(
        [*service_names, health_name, reflection.SERVICE_NAME], server
    )

    if server.add_insecure_port(settings.address) == 0:
        raise RuntimeError(f"{name}: cannot bind {settings.address}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()

    async def start_then_serve() -> bool:
        if lifecycle is not None:
            for service in ["", *service_names]:
                await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
            try:
                await lifecycle.start()
            except Exception:
                logger.exception("could not start")
                stop.set()
                return False
        for service in ["", *service_names]:
            await health.set(service, health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "serving",
            extra={
                "address": settings.address,
                "services": service_names,
                "metrics_port": settings.metrics_port,
            },
        )
        return True

    # Started beside the signal wait, so that SIGTERM during a long model load is honoured.
    starting = asyncio.create_task(start_then_serve())
    await stop.wait()
    starting.cancel()

    logger.info("shutting down", extra={"grace_s": settings.shutdown_grace_s})
    # NOT_SERVING first, so that load balancers and /readyz stop sending new work.
    await health.enter_graceful_shutdown()
    await server.stop(settings.shutdown_grace_s)
    if lifecycle is not None:
        await lifecycle.close()
    logger.info("stopped")
    if starting.done() and not starting.cancelled() and not starting.result():
        raise SystemExit(1)


def run(
    settings: GrpcServiceSettings,
    name: str,
    register: Registrar,
    lifecycle: Lifecycle | None = None,
) -> None:
    configure_logging(name, settings.log_level)
    asyncio.run(serve(settings, name, register, lifecycle))
