"""How training runs record their settings in committed manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def shown(value: Any) -> Any:
    """A run setting as a manifest shows it: paths relative to the checkout (lists too), so
    that no machine's folders end up in a committed file."""
    if isinstance(value, list | tuple):
        return [shown(item) for item in value]
    if isinstance(value, Path):
        resolved = value.resolve()
        return str(resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else value)
    return value
