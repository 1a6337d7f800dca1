"""Model cards of every model the backends serve."""

from __future__ import annotations

import asyncio

import grpc
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from protos.retinal.v1 import common_pb2
from services.gateway.backends import BackendChannels
from services.gateway.problems import PROBLEM_RESPONSES
from services.gateway.rate_limits import RequestTenant
from shared.convert import message_to_dict
from shared.pipeline import BackendError

router = APIRouter(prefix="/v1", tags=["models"])


class ModelCard(BaseModel):
    """retinal.v1.ModelCard: what a model is, what it was trained on, how it measured."""

    service: str
    name: str
    version: str
    sha256: str
    task: str = ""
    training_data: str = Field(default="", description="JSON: datasets and image ids used")
    metrics: dict[str, float] = Field(default_factory=dict)
    license: str = ""


class ModelList(BaseModel):
    models: list[ModelCard]


@router.get("/models", response_model=ModelList, responses=PROBLEM_RESPONSES)
async def list_models(request: Request, tenant: RequestTenant) -> ModelList:
    """Name, version, sha256, task, training data and metrics of each loaded model."""
    backends: BackendChannels = request.app.state.backends
    deadline = backends.settings.health_deadline_s

    async def cards(service: str) -> list[ModelCard]:
        try:
            reply = await backends.stub(service).ListModels(
                common_pb2.ListModelsRequest(), timeout=deadline
            )
        except grpc.aio.AioRpcError as error:
            raise BackendError(service, error.code(), error.details() or "") from error
        return [ModelCard(service=service, **message_to_dict(card)) for card in reply.models]

    found = await asyncio.gather(*(cards(name) for name in backends.channels))
    return ModelList(models=[card for group in found for card in group])
