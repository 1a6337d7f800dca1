"""Per-tenant rate limits (moving window, the `limits` library): 429 problem+json past them.

Three budgets: analyses (each one costs seconds of backend CPU), chats (answers of the
language model, seconds of generation each) and everything else under /v1.
The counters live in `RETINAL_GATEWAY_RATE_LIMIT_STORAGE`: `memory://` (one gateway process)
or `redis://host:port/db` (shared by every replica).
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Literal

from fastapi import Depends, Request
from limits import parse, storage, strategies

from services.gateway.problems import Problem
from services.gateway.tenants import current_tenant

Budget = Literal["analyses", "chats", "requests"]


class RateLimits:
    def __init__(self, storage_url: str, analyses: str, chats: str, requests: str) -> None:
        self.limiter = strategies.MovingWindowRateLimiter(storage.storage_from_string(storage_url))
        self.items = {
            "analyses": parse(analyses),
            "chats": parse(chats),
            "requests": parse(requests),
        }

    def take(self, tenant: str, budget: Budget) -> None:
        """Count one request of `tenant` against `budget`; Problem 429 when it is spent."""
        item = self.items[budget]
        if self.limiter.hit(item, tenant, budget):
            return
        reset_at = self.limiter.get_window_stats(item, tenant, budget).reset_time
        retry_after = max(1, math.ceil(reset_at - time.time()))
        raise Problem(
            429,
            "rate-limited",
            "Too many requests",
            f"tenant rate limit for {budget}: {item}; retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )


def _quota(budget: Budget):  # type: ignore[no-untyped-def]
    async def take(request: Request, tenant: Annotated[str, Depends(current_tenant)]) -> str:
        request.app.state.rate_limits.take(tenant, budget)
        return tenant

    return take


# Use these instead of `Tenant` on routes: they authenticate, then count.
AnalysisTenant = Annotated[str, Depends(_quota("analyses"))]
ChatTenant = Annotated[str, Depends(_quota("chats"))]
RequestTenant = Annotated[str, Depends(_quota("requests"))]
