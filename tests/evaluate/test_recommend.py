"""Recommendations respect the accuracy budget, the objective and feasibility, and explain
themselves when nothing qualifies."""

from __future__ import annotations

import pytest

from edgesplit.errors import ConfigError
from edgesplit.evaluate.recommend import recommend, reference_accuracy, within_budget


def _lat(total: float | None, reason: str = "", frame: int = 100) -> dict:
    return {"total_ms": total, "feasible": total is not None, "reason": reason,
            "frame_bytes_up": frame}


def _row(cut: str, codec: str, acc: float, nbytes: float, lat: dict) -> dict:
    return {"cut": cut, "codec": codec, "grad_codec": "fp32", "accuracy_mean": acc,
            "bytes_per_sample": nbytes, "latency": lat}


ROWS = [
    # cut a: fp32 is the reference (0.95)
    _row("a", "fp32", 0.95, 1000, {"pi": {"wifi": _lat(50.0), "lora": _lat(None, "too big")}}),
    _row("a", "q8", 0.948, 260, {"pi": {"wifi": _lat(30.0), "lora": _lat(None, "too big")}}),
    _row("a", "q4", 0.945, 130, {"pi": {"wifi": _lat(35.0), "lora": _lat(None, "frame 140 B")}}),
    _row("a", "q1", 0.80, 40, {"pi": {"wifi": _lat(10.0), "lora": _lat(900.0)}}),
    # cut b: worse fp32; its q8 is within 1 point of *its own* fp32 but not of the best
    _row("b", "fp32", 0.90, 500, {"pi": {"wifi": _lat(20.0), "lora": _lat(None, "too big")}}),
    _row("b", "q8", 0.899, 130, {"pi": {"wifi": _lat(5.0), "lora": _lat(None, "too big")}}),
]


def test_reference_is_the_best_fp32_over_all_cuts() -> None:
    base = reference_accuracy(ROWS)
    assert base.accuracy == 0.95 and base.cut == "a" and "fp32" in base.description
    assert within_budget(ROWS, 1.0, base) == [True, True, True, False, False, False]
    no_fp32 = [r for r in ROWS if r["codec"] != "fp32"]
    assert "no fp32 row" in reference_accuracy(no_fp32).description


def test_latency_objective_within_budget() -> None:
    recs = recommend(ROWS, ["pi"], ["wifi", "lora"], max_drop=1.0)
    wifi, lora = recs
    # q1 (10 ms) and cut b (5 ms) are faster but outside the budget: q8 at 30 ms wins
    assert (wifi.cut, wifi.codec, wifi.latency_ms) == ("a", "q8", 30.0)
    assert wifi.drop_points == pytest.approx(0.2)
    assert wifi.drop_points <= 1.0 and wifi.found and wifi.row == 1
    assert "lowest latency" in wifi.reason
    # on LoRa everything within budget is infeasible: no recommendation, and why
    assert not lora.found and lora.codec is None
    assert "infeasible" in lora.reason and "frame 140 B" in lora.reason   # the smallest one


def test_bytes_objective() -> None:
    (wifi,) = recommend(ROWS, ["pi"], ["wifi"], max_drop=1.0, objective="bytes")
    assert (wifi.cut, wifi.codec) == ("a", "q4")
    assert "fewest bytes" in wifi.reason


def test_a_wider_budget_admits_more() -> None:
    wifi, lora = recommend(ROWS, ["pi"], ["wifi", "lora"], max_drop=20.0)
    assert (wifi.cut, wifi.codec) == ("b", "q8")        # 5 ms, 5.1 points below
    assert (lora.cut, lora.codec) == ("a", "q1")        # the only feasible one on LoRa
    for rec in (wifi, lora):
        assert rec.drop_points <= 20.0


def test_nothing_within_budget_says_so() -> None:
    rows = [_row("a", "fp32", 0.95, 1000, {"pi": {"wifi": _lat(None, "no memory")}}),
            _row("a", "q1", 0.5, 40, {"pi": {"wifi": _lat(3.0)}})]
    (rec,) = recommend(rows, ["pi"], ["wifi"], max_drop=0.5)
    assert not rec.found
    assert "infeasible" in rec.reason and "no memory" in rec.reason
    rows = [_row("a", "q4", 0.7, 100, {}), _row("a", "q1", 0.5, 40, {})]
    base = reference_accuracy(rows)
    (rec,) = recommend(rows, ["pi"], ["wifi"], max_drop=0.0, baseline=base)
    assert rec.found is False and "no latency estimate" in rec.reason
    (rec,) = recommend([], ["pi"], ["wifi"], max_drop=1.0)
    assert "no results" in rec.reason


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="objective"):
        recommend(ROWS, ["pi"], ["wifi"], max_drop=1.0, objective="joules")
    with pytest.raises(ConfigError, match="max-drop"):
        recommend(ROWS, ["pi"], ["wifi"], max_drop=-1.0)
