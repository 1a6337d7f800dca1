"""API keys per tenant: `Authorization: Bearer <key>` names the tenant that owns every object.

Keys are kept only as SHA-256 hex digests. They are random tokens (`retinal api-key` makes
32-byte ones), so a slow password hash would add nothing, and a digest can sit in a config
file. They come from `RETINAL_GATEWAY_API_KEYS` ("tenant:digest,tenant:digest") and/or the
JSON file `RETINAL_GATEWAY_API_KEYS_FILE` ({"tenant": ["digest", ...]}). With no key
configured the gateway is open and everything belongs to the tenant `local` (the embedded
single-user default; the gateway logs a warning at start). The file is read again when it
changes: keys rotate without a restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.gateway.problems import Problem

logger = logging.getLogger(__name__)

OPEN_TENANT = "local"
_TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_bearer = HTTPBearer(auto_error=False, description="A tenant's API key")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return f"rgpt_{secrets.token_urlsafe(32)}"


def _entries(environment: str, file: Path | None) -> list[tuple[str, str]]:
    entries = []
    for item in filter(None, (part.strip() for part in environment.split(","))):
        tenant, _, key_digest = item.partition(":")
        entries.append((tenant.strip(), key_digest.strip().lower()))
    if file is not None:
        for tenant, digests in json.loads(file.read_text()).items():
            entries.extend((tenant, d.lower()) for d in digests)
    return entries


def load_keys(environment: str, file: Path | None) -> dict[str, str]:
    """{digest: tenant}; ValueError on a malformed entry or a digest given to two tenants."""
    keys: dict[str, str] = {}
    for tenant, key_digest in _entries(environment, file):
        if not _TENANT_NAME.match(tenant):
            raise ValueError(f"bad tenant name {tenant!r} (letters, digits, . _ -; up to 64)")
        if not _DIGEST.match(key_digest):
            raise ValueError(f"tenant {tenant!r}: a key must be given as its SHA-256 hex digest")
        if keys.setdefault(key_digest, tenant) != tenant:
            raise ValueError(f"one key is configured for two tenants ({tenant!r})")
    return keys


class KeyRing:
    """The configured keys. The key file is read again when it changes, so that keys rotate
    without a restart; a broken new version is logged and the keys in force are kept."""

    def __init__(self, environment: str, file: Path | None) -> None:
        self.environment = environment
        self.file = file
        self._stamp = self._file_stamp()
        self.keys = load_keys(environment, file)  # a bad configuration stops the start
        if not self.keys:
            logger.warning("no API keys configured: the gateway is open, all data is 'local'")

    def _file_stamp(self) -> tuple[int, int] | None:
        if self.file is None:
            return None
        status = self.file.stat()
        return status.st_mtime_ns, status.st_size

    def _refresh(self) -> None:
        try:
            stamp = self._file_stamp()
        except OSError:
            logger.error("the API key file cannot be read: the loaded keys stay in force")
            return
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            keys = load_keys(self.environment, self.file)
        except (OSError, ValueError) as error:  # json.JSONDecodeError is a ValueError
            logger.error("the new API key file is refused", extra={"error": str(error)})
            return
        self.keys = keys
        logger.info("API keys reloaded", extra={"tenants": len(set(keys.values()))})

    def tenant_of(self, key: str) -> str | None:
        self._refresh()
        return self.keys.get(digest(key))

    @property
    def is_open(self) -> bool:
        self._refresh()
        return not self.keys


def _unauthorized(detail: str) -> Problem:
    return Problem(
        401,
        "unauthorized",
        "An API key is required",
        detail,
        headers={"WWW-Authenticate": 'Bearer realm="retinalgpt"'},
    )


async def current_tenant(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The tenant of the request's API key (401 without a valid one, unless the gateway is open)."""
    ring: KeyRing = request.app.state.api_keys
    if ring.is_open:
        return OPEN_TENANT
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise _unauthorized("send 'Authorization: Bearer <API key>'")
    tenant = ring.tenant_of(credentials.credentials)
    if tenant is None:
        raise _unauthorized("the API key is not known")
    return tenant
