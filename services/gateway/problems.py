"""RFC 9457 problem details: every error the gateway returns is application/problem+json.

`type` is a stable relative URI (/problems/<code>) that clients may switch on; `code` repeats
the last segment for convenience.
"""

from __future__ import annotations

import errno
import logging
import sqlite3

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.imaging import ImageRejected
from shared.pipeline import BackendError

logger = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"


class ProblemDetails(BaseModel):
    """RFC 9457 body (documented in the OpenAPI schema)."""

    type: str
    title: str
    status: int
    detail: str = ""
    code: str
    instance: str | None = None


class Problem(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        title: str,
        detail: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.headers = headers or {}


PROBLEM_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ProblemDetails, "content": {PROBLEM_MEDIA_TYPE: {}}}
    for status in (400, 401, 404, 413, 415, 422, 429, 503, 504, 507)
}

# Ingestion refusals whose HTTP status is not the default 422.
_IMAGE_STATUS = {"too_large_bytes": 413, "unsupported_format": 415}

_BACKEND_PROBLEMS: dict[grpc.StatusCode, tuple[int, str, str]] = {
    grpc.StatusCode.UNAVAILABLE: (503, "backend-unavailable", "A backend service is unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "backend-timeout", "A backend service timed out"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (503, "backend-busy", "A backend service is busy"),
    grpc.StatusCode.INVALID_ARGUMENT: (422, "invalid-input", "A backend refused the input"),
}


def out_of_space(error: BaseException) -> bool:
    """The disk (or quota) under the results store or the batch folder is full."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(error, sqlite3.Error):
        return error.sqlite_errorcode == sqlite3.SQLITE_FULL
    return getattr(error, "sqlstate", None) == "53100"  # PostgreSQL's disk_full


def storage_full() -> Problem:
    """507: unlike an outage (503), space comes back only when an operator frees it."""
    return Problem(
        507,
        "storage-full",
        "The results store is full",
        "no space is left where results are kept, so nothing of this request was stored; "
        "retry once space has been freed",
        headers={"Retry-After": "60"},
    )


def problem_details(request: Request, problem: Problem) -> ProblemDetails:
    return ProblemDetails(
        type=f"/problems/{problem.code}",
        title=problem.title,
        status=problem.status,
        detail=problem.detail,
        code=problem.code,
        instance=request.url.path,
    )


def problem_response(request: Request, problem: Problem) -> JSONResponse:
    body = problem_details(request, problem)
    headers = {"Retry-After": "5"} if problem.status == 503 else {}
    headers.update(problem.headers)
    return JSONResponse(
        body.model_dump(exclude_none=True),
        status_code=problem.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


def from_image_rejected(error: ImageRejected) -> Problem:
    return Problem(
        _IMAGE_STATUS.get(error.code, 422), error.code, "The image was refused", error.detail
    )


def from_backend_error(error: BackendError) -> Problem:
    if error.service == "language" and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        # Every generation slot and queue place is taken: a short wait is the cure.
        return Problem(503, "language-busy", "The language model is busy", error.detail)
    status, code, title = _BACKEND_PROBLEMS.get(
        error.code, (502, "backend-error", "A backend service failed")
    )
    return Problem(status, code, title, f"{error.service}: {error.detail}")


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(request, exc)

    @app.exception_handler(ImageRejected)
    async def _image(request: Request, exc: ImageRejected) -> JSONResponse:
        return problem_response(request, from_image_rejected(exc))

    @app.exception_handler(BackendError)
    async def _backend(request: Request, exc: BackendError) -> JSONResponse:
        logger.warning("backend error", extra={"backend": exc.service, "grpc_code": exc.code.name})
        return problem_response(request, from_backend_error(exc))

    @app.exception_handler(OperationalError)
    async def _store(request: Request, exc: OperationalError) -> JSONResponse:
        if out_of_space(exc.orig):
            logger.error("results store full", extra={"error": type(exc.orig).__name__})
            return problem_response(request, storage_full())
        # The database is down or refusing connections: retryable, not a bug.
        logger.warning("results store error", extra={"error": type(exc.orig).__name__})
        return problem_response(
            request,
            Problem(503, "store-unavailable", "The results store is unavailable", "retry later"),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        return problem_response(
            request, Problem(422, "validation-error", "The request is not valid", detail)
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not-found" if exc.status_code == 404 else f"http-{exc.status_code}"
        return problem_response(request, Problem(exc.status_code, code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return problem_response(request, Problem(500, "internal-error", "Internal error"))
