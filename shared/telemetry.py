"""Request ids across services, and Prometheus metrics for every gRPC service.

The gateway (or a batch task) names each piece of work with a request id and sends it as
`x-request-id` gRPC metadata; the services' interceptor puts it in a context variable that
every log record of that call carries (`request_id`), and counts and times the call.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

REQUEST_ID_METADATA = "x-request-id"
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
logger = logging.getLogger("shared.telemetry.access")

GRPC_REQUESTS = Counter(
    "retinal_grpc_requests_total", "gRPC calls served", ["service", "method", "code"]
)
GRPC_LATENCY = Histogram(
    "retinal_grpc_request_duration_seconds",
    "gRPC call latency",
    ["service", "method"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)


def outgoing_metadata(rid: str | None) -> tuple[tuple[str, str], ...]:
    """Metadata that carries `rid` to a backend (none when there is no id)."""
    return ((REQUEST_ID_METADATA, rid),) if rid else ()


class RequestIdFilter(logging.Filter):
    """Adds the current call's request id to every log record (empty outside a call)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = request_id.get()
        return True


def _incoming_id(details: grpc.HandlerCallDetails) -> str:
    for key, value in details.invocation_metadata or ():
        if key == REQUEST_ID_METADATA and isinstance(value, str) and len(value) <= 64:
            return value
    return ""


class TelemetryInterceptor(grpc.aio.ServerInterceptor):
    """Request id into the context; one access log line, a count and a latency per call."""

    def __init__(self, service: str) -> None:
        self.service = service

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        own = details.method.startswith("/retinal.")  # not health checks or reflection
        if handler is None or not own:
            return handler  # unknown and infrastructure calls pass through
        method = details.method.rsplit("/", 1)[-1]
        rid = _incoming_id(details)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method, rid),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, method, rid),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _record(self, method: str, code: Any, started: float) -> None:
        elapsed = time.perf_counter() - started
        if not isinstance(code, grpc.StatusCode):  # context.code() may give the raw number
            code = grpc.StatusCode.UNKNOWN
        GRPC_REQUESTS.labels(self.service, method, code.name).inc()
        GRPC_LATENCY.labels(self.service, method).observe(elapsed)
        logger.info(
            "call",
            extra={"method": method, "code": code.name, "duration_ms": round(elapsed * 1000, 1)},
        )

    def _unary(self, behaviour: Any, method: str, rid: str) -> Any:
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            request_id.set(rid)
            started = time.perf_counter()
            code: Any = grpc.StatusCode.OK
            try:
                return await behaviour(request, context)
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                self._record(method, code, started)

        return observed

    def _streaming(self, behaviour: Any, method: str, rid: str) -> Any:
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            request_id.set(rid)
            started = time.perf_counter()
            code: Any = grpc.StatusCode.OK
            try:
                async for response in behaviour(request, context):
                    yield response
            except BaseException:
                code = context.code() or grpc.StatusCode.CANCELLED
                raise
            finally:
                self._record(method, code, started)

        return observed
