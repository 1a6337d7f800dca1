"""The gateway's FastAPI application: REST for hospital systems, gRPC to the backends."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from services.gateway.analyses.api_router import router as analyses_router
from services.gateway.backends import BackendChannels
from services.gateway.batches.api_router import router as batches_router
from services.gateway.batches.queue import BatchQueue, reconcile_forever
from services.gateway.chat.api_router import router as chat_router
from services.gateway.health.api_router import router as health_router
from services.gateway.models.api_router import router as models_router
from services.gateway.observability import install_middleware
from services.gateway.problems import install_handlers
from services.gateway.rate_limits import RateLimits
from services.gateway.settings import GatewaySettings
from services.gateway.store import ResultsStore
from services.gateway.tenants import KeyRing
from services.worker.settings import WorkerSettings
from shared.imaging import IngestLimits

CONSOLE = Path(__file__).resolve().parent / "console"


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.backends = BackendChannels(settings)
        app.state.store = ResultsStore(settings.results_url)
        # Batches go to the worker's queue, configured as the worker is.
        app.state.batch_queue = BatchQueue(WorkerSettings())
        reconciler = asyncio.create_task(
            reconcile_forever(
                app.state.batch_queue,
                app.state.store,
                settings.batch_reconcile_interval_s,
                settings.batch_unsent_grace_s,
            )
        )
        yield
        reconciler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reconciler
        app.state.batch_queue.close()
        await app.state.backends.close()
        app.state.store.close()

    app = FastAPI(
        title="RetinalGPT gateway",
        version="0.1.0",
        description="Colour fundus photographs in; quality, measurements, lesions, "
        "assessment and a grounded assistant out.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.ingest_limits = IngestLimits(max_bytes=settings.max_upload_bytes)
    app.state.api_keys = KeyRing(settings.api_keys, settings.api_keys_file)
    app.state.rate_limits = RateLimits(
        settings.rate_limit_storage,
        settings.rate_limit_analyses,
        settings.rate_limit_chats,
        settings.rate_limit_requests,
    )
    install_middleware(app)
    install_handlers(app)
    app.include_router(health_router)
    app.include_router(analyses_router)
    app.include_router(batches_router)
    app.include_router(chat_router)
    app.include_router(models_router)
    # The web console: static files, mounted last so that every API route comes first.
    app.mount("/", StaticFiles(directory=CONSOLE, html=True), name="console")
    return app
