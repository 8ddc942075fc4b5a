"""Pareto frontier of (maximise accuracy, minimise bytes): non-domination, ties, NaN."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from edgesplit.evaluate.pareto import dominates, frontier, mark_pareto, pareto_mask

# few distinct values so ties (equal accuracy and/or equal bytes) happen often
_acc = st.sampled_from([0.5, 0.7, 0.8, 0.9, 0.95, math.nan])
_bytes = st.sampled_from([10.0, 20.0, 40.0, 80.0, 160.0])
points = st.lists(st.tuples(_acc, _bytes), max_size=30)


@settings(max_examples=300, deadline=None)
@given(points)
def test_frontier_is_exactly_the_non_dominated_points(pts: list[tuple[float, float]]) -> None:
    mask = pareto_mask(pts)
    for i, p in enumerate(pts):
        dominated = any(dominates(q, p) for j, q in enumerate(pts) if j != i)
        valid = not (math.isnan(p[0]) or math.isnan(p[1]))
        assert mask[i] == (valid and not dominated), (i, p, pts)
    # every valid point off the frontier is dominated by one on it (the frontier covers all)
    for i, p in enumerate(pts):
        if not mask[i] and not math.isnan(p[0]):
            assert any(mask[j] and dominates(pts[j], p) for j in range(len(pts)))


def test_definition_cases() -> None:
    assert dominates((0.9, 10), (0.8, 10))       # same bytes, more accurate
    assert dominates((0.9, 10), (0.9, 20))       # same accuracy, fewer bytes
    assert dominates((0.9, 10), (0.8, 20))
    assert not dominates((0.9, 10), (0.9, 10))   # a tie dominates nothing
    assert not dominates((0.9, 20), (0.8, 10))   # a trade-off
    assert not dominates((math.nan, 1), (0.1, 100))


def test_ties_stay_on_the_frontier_together() -> None:
    pts = [(0.9, 10.0), (0.9, 10.0), (0.8, 10.0), (0.95, 50.0), (0.95, 60.0)]
    assert pareto_mask(pts) == [True, True, False, True, False]


def test_rows_and_frontier_order() -> None:
    rows = [
        {"codec": "fp32", "accuracy_mean": 0.95, "bytes_per_sample": 1000.0},
        {"codec": "q8", "accuracy_mean": 0.95, "bytes_per_sample": 260.0},
        {"codec": "q4", "accuracy_mean": 0.94, "bytes_per_sample": 130.0},
        {"codec": "q2", "accuracy_mean": 0.80, "bytes_per_sample": 70.0},
        {"codec": "q1", "accuracy_mean": 0.60, "bytes_per_sample": 90.0},
        {"codec": "failed", "accuracy_mean": None, "bytes_per_sample": 1.0},
    ]
    assert mark_pareto(rows) == [False, True, True, True, False, False]
    assert [r["codec"] for r in frontier(rows)] == ["q2", "q4", "q8"]
    # any key works: up bytes only
    assert mark_pareto(rows, bytes_key="missing") == [False] * 6
