"""The Pareto frontier of accuracy (maximise) against bytes (minimise).

Definition used everywhere in edgesplit:

    point *a* **dominates** point *b* when ``a.accuracy >= b.accuracy`` and
    ``a.bytes <= b.bytes``, with at least one of the two strict.

A point is **on the frontier** when no other point dominates it. Consequences, on purpose:

* **ties**: two configurations with exactly the same accuracy and bytes do not dominate each
  other, so both stay on the frontier (neither is better; the report shows both);
* same accuracy, fewer bytes dominates; same bytes, higher accuracy dominates;
* a point with a NaN coordinate (a failed run) is never on the frontier and dominates nothing.

The bytes axis of the reports is ``bytes_per_sample`` = bytes up + bytes down per training
sample (everything that crosses the wire); the functions take any key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from edgesplit.jsonable import as_number as _num

#: Row keys the sweep's frontier uses.
ACCURACY_KEY = "accuracy_mean"
BYTES_KEY = "bytes_per_sample"


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether ``a = (accuracy, bytes)`` dominates ``b`` (see the module docstring)."""
    acc_a, bytes_a = a
    acc_b, bytes_b = b
    if not _valid(a) or not _valid(b):
        return False
    return acc_a >= acc_b and bytes_a <= bytes_b and (acc_a > acc_b or bytes_a < bytes_b)


def pareto_mask(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For each ``(accuracy, bytes)`` point, whether it is on the frontier.

    Sort by bytes ascending then accuracy descending; sweeping left to right, a point is on the
    frontier iff its accuracy is at least the best seen so far among points with fewer bytes
    and no equal-bytes point is more accurate. O(n log n).
    """
    order = sorted(
        (i for i, p in enumerate(points) if _valid(p)),
        key=lambda i: (points[i][1], -points[i][0]),
    )
    mask = [False] * len(points)
    best_acc = -math.inf           # best accuracy among points with strictly fewer bytes
    j = 0
    while j < len(order):
        # one group of equal bytes; its most accurate points are first
        k = j
        group_bytes = points[order[j]][1]
        while k < len(order) and points[order[k]][1] == group_bytes:
            k += 1
        top = points[order[j]][0]
        for i in order[j:k]:
            acc = points[i][0]
            # dominated by an equal-bytes point with higher accuracy, or by a cheaper point
            # that is at least as accurate
            mask[i] = acc == top and acc > best_acc
        best_acc = max(best_acc, top)
        j = k
    return mask


def mark_pareto(rows: Sequence[Mapping[str, Any]], accuracy_key: str = ACCURACY_KEY,
                bytes_key: str = BYTES_KEY) -> list[bool]:
    """:func:`pareto_mask` over rows (dicts); a missing or ``None`` value counts as NaN."""
    return pareto_mask([(_num(r.get(accuracy_key)), _num(r.get(bytes_key))) for r in rows])


def frontier(rows: Sequence[Mapping[str, Any]], accuracy_key: str = ACCURACY_KEY,
             bytes_key: str = BYTES_KEY) -> list[Mapping[str, Any]]:
    """The frontier rows, sorted by bytes ascending (the order a frontier line is drawn in)."""
    mask = mark_pareto(rows, accuracy_key, bytes_key)
    out = [r for r, m in zip(rows, mask, strict=True) if m]
    return sorted(out, key=lambda r: (_num(r.get(bytes_key)), -_num(r.get(accuracy_key))))


def _valid(p: tuple[float, float]) -> bool:
    return not (math.isnan(p[0]) or math.isnan(p[1]))

