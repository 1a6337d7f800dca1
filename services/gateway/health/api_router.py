"""Liveness, readiness and metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from grpc_health.v1 import health_pb2
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.gateway.backends import BackendChannels
from services.gateway.health.protocol import Liveness, Readiness
from services.gateway.observability import BACKEND_UP
from services.gateway.problems import PROBLEM_MEDIA_TYPE

router = APIRouter(tags=["operations"])

_SERVING = health_pb2.HealthCheckResponse.ServingStatus.Name(health_pb2.HealthCheckResponse.SERVING)


@router.get("/healthz", response_model=Liveness)
async def healthz() -> Liveness:
    """The gateway process is alive (says nothing about the backends)."""
    return Liveness(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "content": {PROBLEM_MEDIA_TYPE: {}}}},
)
async def readyz(request: Request) -> Response:
    """Ready only when every backend answers SERVING to grpc.health.v1 and the store answers."""
    backends: BackendChannels = request.app.state.backends
    statuses, store_ok = await asyncio.gather(
        backends.statuses(), asyncio.to_thread(request.app.state.store.reachable)
    )
    for name, status in statuses.items():
        BACKEND_UP.labels(name).set(1 if status == _SERVING else 0)
    ready = store_ok and all(status == _SERVING for status in statuses.values())
    body = Readiness(ready=ready, backends=statuses, store="ok" if store_ok else "unreachable")
    if ready:
        return JSONResponse(body.model_dump())
    down = ", ".join(
        [f"{n}={s}" for n, s in statuses.items() if s != _SERVING]
        + ([] if store_ok else ["store=unreachable"])
    )
    problem = {
        "type": "/problems/not-ready",
        "title": "Not all backends are serving",
        "status": 503,
        "detail": down,
        "code": "not-ready",
        "instance": request.url.path,
        **body.model_dump(),
    }
    return JSONResponse(
        problem, status_code=503, media_type=PROBLEM_MEDIA_TYPE, headers={"Retry-After": "5"}
    )


@router.get("/metrics", response_class=Response)
async def metrics() -> Response:
    """Prometheus exposition format."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
