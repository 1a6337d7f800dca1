"""Response models of the operations endpoints."""

from pydantic import BaseModel


class Liveness(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    # Each backend's grpc.health.v1 status (SERVING, NOT_SERVING) or gRPC error code.
    backends: dict[str, str]
    # The results store: "ok" or "unreachable".
    store: str = "ok"
