"""Request ids and Prometheus metrics for every HTTP request."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from prometheus_client import Counter, Gauge, Histogram

from shared.telemetry import request_id as current_request_id

logger = logging.getLogger("services.gateway.access")

REQUEST_ID_HEADER = "X-Request-ID"
# Accept a caller's id only when it is short and plain: it is echoed and logged.
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

HTTP_REQUESTS = Counter(
    "retinal_gateway_http_requests_total", "HTTP requests", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "retinal_gateway_http_request_duration_seconds", "HTTP request latency", ["method", "route"]
)
BACKEND_UP = Gauge(
    "retinal_gateway_backend_up",
    "1 when the backend answered SERVING at the last check",
    ["backend"],
)


def _route_template(request: Request) -> str:
    # The matched route's path template, never the raw path (unbounded label values).
    route = request.scope.get("route")
    return getattr(route, "path", "unmatched")


def install_middleware(app: FastAPI) -> None:
    @app.middleware("http")
    async def observe(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        incoming = request.headers.get(REQUEST_ID_HEADER, "")
        request_id = incoming if _SAFE_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        request.state.request_id = request_id
        current_request_id.set(request_id)  # every log line of this request carries it
        started = time.perf_counter()
        response = await call_next(request)
        elapsed = time.perf_counter() - started
        route = _route_template(request)
        HTTP_REQUESTS.labels(request.method, route, str(response.status_code)).inc()
        HTTP_LATENCY.labels(request.method, route).observe(elapsed)
        response.headers[REQUEST_ID_HEADER] = request_id
        logger.info(
            "request",
            extra={
                "request_id": request_id,
                "method": request.method,
                "route": route,
                "status": response.status_code,
                "duration_ms": round(elapsed * 1000, 1),
            },
        )
        return response
