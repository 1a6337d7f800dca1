"""Central retinal artery / vein equivalents from the six widest vessels of a zone.

Both formulas combine the widths pairwise, iteratively (Knudtson et al. 2003): sort, pair the
widest with the narrowest, the second widest with the second narrowest, and so on, carrying
the middle one of an odd count to the next round, until one value is left. Six widths give
three, then two, then one, exactly AutoMorph's rounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

VesselKind = Literal["artery", "vein"]
BIG_SIX = 6

_KNUDTSON = {"artery": 0.88, "vein": 0.95}


def knudtson_pair(narrow: float, wide: float, kind: VesselKind) -> float:
    """Knudtson's revised formula, any length unit: k * sqrt(w1^2 + w2^2)."""
    return _KNUDTSON[kind] * math.hypot(narrow, wide)


def hubbard_pair(narrow: float, wide: float, kind: VesselKind) -> float | None:
    """Hubbard's formula (ARIC 1999), widths in micrometres; None if the root is negative."""
    if kind == "artery":
        square = 0.87 * narrow**2 + 1.01 * wide**2 - 0.22 * narrow * wide - 10.76
    else:
        square = 0.72 * narrow**2 + 0.91 * wide**2 + 450.05
    return math.sqrt(square) if square >= 0 else None


def knudtson(widths: Sequence[float], kind: VesselKind) -> float | None:
    """CRAE (arteries) or CRVE (veins) by Knudtson from the six widest; None if fewer."""
    return _summarise(widths, lambda a, b: knudtson_pair(a, b, kind))


def hubbard(widths_um: Sequence[float], kind: VesselKind) -> float | None:
    """CRAE / CRVE by Hubbard from the six widest widths in micrometres; None if fewer."""
    return _summarise(widths_um, lambda a, b: hubbard_pair(a, b, kind))


def _summarise(
    widths: Sequence[float], combine: Callable[[float, float], float | None]
) -> float | None:
    values: list[float] = sorted(widths)[-BIG_SIX:]
    if len(values) < BIG_SIX:
        return None
    while len(values) > 1:
        half = len(values) // 2
        merged: list[float] = []
        for narrow, wide in zip(values[:half], values[::-1][:half], strict=True):
            combined = combine(narrow, wide)
            if combined is None:
                return None
            merged.append(combined)
        if len(values) % 2:
            merged.append(values[half])
        values = sorted(merged)
    return values[0]
