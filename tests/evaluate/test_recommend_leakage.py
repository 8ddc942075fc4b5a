"""A leakage budget (--max-psnr, --max-label-auc) narrows the recommendation to cells that leak
less, and says so when none qualifies."""

from __future__ import annotations

import pytest

from edgesplit.errors import ConfigError
from edgesplit.evaluate.recommend import recommend, within_leakage


def _row(codec: str, acc: float, lat: float, psnr: float | None, auc: float | None) -> dict:
    row = {"cut": "a", "codec": codec, "grad_codec": "fp32", "accuracy_mean": acc,
           "bytes_per_sample": 100.0, "latency": {"pi": {"wifi": {"total_ms": lat,
                                                                  "feasible": True}}}}
    if psnr is not None:
        row["privacy"] = {"inversion_psnr_db": psnr, "label_auc": auc}
    return row


ROWS = [
    _row("fp32", 0.95, 50.0, 19.0, 1.0),
    _row("q8", 0.948, 30.0, 18.5, 1.0),          # fastest, leaks most
    _row("noisy", 0.946, 40.0, 11.5, 0.99),      # inversion defended
    _row("both", 0.945, 45.0, 11.4, 0.55),       # inversion and labels defended
]


def test_within_leakage() -> None:
    assert within_leakage(ROWS) == [True] * 4
    assert within_leakage(ROWS, max_psnr=12) == [False, False, True, True]
    assert within_leakage(ROWS, max_psnr=12, max_label_auc=0.6) == [False, False, False, True]
    # not measured: does not qualify under a limit
    assert within_leakage([_row("x", 0.9, 1.0, None, None)], max_psnr=30) == [False]
    # a label AUC that does not apply (ushape) passes a label budget
    assert within_leakage([_row("u", 0.9, 1.0, 10.0, None)], max_label_auc=0.6) == [True]
    with pytest.raises(ConfigError, match="--max-label-auc must be a finite number >= 0.5"):
        within_leakage(ROWS, max_label_auc=0.2)


def test_recommendation_respects_the_leakage_budget() -> None:
    (plain,) = recommend(ROWS, ["pi"], ["wifi"], max_drop=1.0)
    assert plain.codec == "q8"
    (private,) = recommend(ROWS, ["pi"], ["wifi"], max_drop=1.0, max_psnr=12.0)
    assert private.codec == "noisy"
    (both,) = recommend(ROWS, ["pi"], ["wifi"], max_drop=1.0, max_psnr=12.0, max_label_auc=0.6)
    assert both.codec == "both"
    (none,) = recommend(ROWS, ["pi"], ["wifi"], max_drop=1.0, max_psnr=5.0)
    assert not none.found and "--max-psnr 5" in none.reason and "leakage budget" in none.reason
