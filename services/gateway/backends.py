"""gRPC channels from the gateway to the backend services, and their readiness."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.retinal.v1 import analysis_pb2_grpc, language_pb2_grpc, lesion_pb2_grpc
from services.gateway.settings import GatewaySettings
from shared.grpc_server import client_options
from shared.pipeline import Backends


class _ModelLister(Protocol):
    ListModels: Any


_STUBS: dict[str, Callable[[grpc.aio.Channel], _ModelLister]] = {
    "analysis": analysis_pb2_grpc.AnalysisServiceStub,
    "lesion": lesion_pb2_grpc.LesionServiceStub,
    "language": language_pb2_grpc.LanguageServiceStub,
}


@dataclass
class BackendChannels:
    settings: GatewaySettings
    channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)

    def __post_init__(self) -> None:
        options = client_options(self.settings.max_message_bytes)
        addresses = {
            "analysis": self.settings.analysis_addr,
            "lesion": self.settings.lesion_addr,
            "language": self.settings.language_addr,
        }
        self.channels = {
            name: grpc.aio.insecure_channel(address, options=options)
            for name, address in addresses.items()
        }

    @property
    def pipeline(self) -> Backends:
        return Backends(
            analysis=analysis_pb2_grpc.AnalysisServiceStub(self.channels["analysis"]),
            lesion=lesion_pb2_grpc.LesionServiceStub(self.channels["lesion"]),
            analysis_deadline_s=self.settings.analysis_deadline_s,
            lesion_deadline_s=self.settings.lesion_deadline_s,
        )

    def stub(self, service: str) -> _ModelLister:
        """A stub of `service` ("analysis", "lesion" or "language") for its common calls."""
        return _STUBS[service](self.channels[service])

    @property
    def language(self) -> language_pb2_grpc.LanguageServiceStub:
        return language_pb2_grpc.LanguageServiceStub(self.channels["language"])

    async def _status(self, channel: grpc.aio.Channel) -> str:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(), timeout=self.settings.health_deadline_s
            )
        except grpc.aio.AioRpcError as error:
            return error.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def statuses(self) -> dict[str, str]:
        """Each backend's grpc.health.v1 status name (or the gRPC error code name)."""
        names = list(self.channels)
        results = await asyncio.gather(*(self._status(self.channels[n]) for n in names))
        return dict(zip(names, results, strict=True))

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self.channels.values()))
