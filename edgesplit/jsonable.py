"""Strict JSON for results: NaN and ±inf (an fp32 SNR is inf) become ``None``."""

from __future__ import annotations

import math
from typing import Any


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats replaced by ``None``, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def as_number(value: Any) -> float:
    """``value`` as a float for sorting and formatting result rows: ``nan`` for ``None``, a
    bool (a flag is not a number) or anything ``float()`` refuses."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
