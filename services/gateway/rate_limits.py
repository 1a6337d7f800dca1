"""Per-tenant rate limits (moving window, the `limits` library): 429 problem+json past them.

Three budgets: analyses (each one costs seconds of backend CPU), chats (answers of the
language model, seconds of generation each) and everything else under /v1.
The counters live in `RETINAL_GATEWAY_RATE_LIMIT_STORAGE`: `memory://` (one gateway process)
or `redis://host:port/db` (shared by every replica). Counters that cannot be reached (Redis
down or stalled) do not refuse work: the request is served uncounted, with a warning logged
when the outage starts and a note when it ends. Refusing every request for want of a counter
would turn a Redis outage into a gateway outage; the backends still refuse what they cannot
take (503 busy).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Annotated, Literal

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from limits import parse, storage, strategies
from limits.errors import StorageError

from services.gateway.problems import Problem
from services.gateway.tenants import current_tenant

logger = logging.getLogger(__name__)

Budget = Literal["analyses", "chats", "requests"]

# Seconds a Redis counter may take (the default is to wait forever).
REDIS_TIMEOUT_S = 0.5


class RateLimits:
    def __init__(self, storage_url: str, analyses: str, chats: str, requests: str) -> None:
        options = (
            {"socket_timeout": REDIS_TIMEOUT_S, "socket_connect_timeout": REDIS_TIMEOUT_S}
            if storage_url.startswith(("redis://", "rediss://"))
            else {}
        )
        counters = storage.storage_from_string(storage_url, wrap_exceptions=True, **options)
        self.limiter = strategies.MovingWindowRateLimiter(counters)
        self.counters_down = False
        self.items = {
            "analyses": parse(analyses),
            "chats": parse(chats),
            "requests": parse(requests),
        }

    def take(self, tenant: str, budget: Budget) -> None:
        """Count one request of `tenant` against `budget`; Problem 429 when it is spent."""
        item = self.items[budget]
        try:
            allowed = self.limiter.hit(item, tenant, budget)
            stats = None if allowed else self.limiter.get_window_stats(item, tenant, budget)
        except StorageError as error:
            if not self.counters_down:
                logger.warning(
                    "rate-limit counters unavailable: requests are served uncounted",
                    extra={"error": type(error.storage_error).__name__},
                )
            self.counters_down = True
            return
        if self.counters_down:
            logger.info("rate-limit counters available again")
            self.counters_down = False
        if stats is None:
            return
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        raise Problem(
            429,
            "rate-limited",
            "Too many requests",
            f"tenant rate limit for {budget}: {item}; retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )


def _quota(budget: Budget):  # type: ignore[no-untyped-def]
    async def take(request: Request, tenant: Annotated[str, Depends(current_tenant)]) -> str:
        # In a worker thread: a stalled Redis then delays this request alone, not the event
        # loop and every request with it (the memory storage is thread-safe).
        await run_in_threadpool(request.app.state.rate_limits.take, tenant, budget)
        return tenant

    return take


# Use these instead of `Tenant` on routes: they authenticate, then count.
AnalysisTenant = Annotated[str, Depends(_quota("analyses"))]
ChatTenant = Annotated[str, Depends(_quota("chats"))]
RequestTenant = Annotated[str, Depends(_quota("requests"))]
