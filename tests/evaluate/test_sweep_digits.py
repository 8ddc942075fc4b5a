"""Acceptance: a small real sweep on digits through ``edgesplit evaluate`` and the in-process
engine -- 2 cuts x 4 codecs (fp32, q8+zstd, q4+zstd, q2+zstd) x 1 seed, 2 epochs.

Checks that the files exist and hold consistent numbers: bytes strictly decrease
fp32 -> q8 -> q4 -> q2 for the same cut; frontier rows are not dominated; every recommendation
respects the budget (and the ones that do not exist say why); the PNGs are valid images of
non-trivial size; the FL comparison follows its formulas; a rerun trains nothing.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from edgesplit.cli.main import main
from edgesplit.evaluate.pareto import dominates

CODECS = ["fp32", "q8+zstd", "q4+zstd", "q2+zstd"]
CUTS = ["relu1", "relu2"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_DROP = 3.0


@pytest.mark.slow
def test_small_sweep_on_digits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval"
    argv = ["evaluate", "--data", "digits", "--cuts", ",".join(CUTS), "--codecs",
            ",".join(CODECS), "--seeds", "1", "--epochs", "2", "--max-drop", str(MAX_DROP),
            "--compare-fl", "--out", str(out), "--json"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)

    for name in ("results.json", "results.csv", "report.md", "accuracy_vs_bytes.png",
                 "latency.png"):
        assert (out / name).is_file(), name
    for name in ("accuracy_vs_bytes.png", "latency.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name

    doc = json.loads((out / "results.json").read_text())
    assert printed["rows"] == doc["rows"]
    rows = doc["rows"]
    assert [(r["cut"], r["codec"]) for r in rows] == [(c, k) for c in CUTS for k in CODECS]
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    required = ("cut", "codec", "grad_codec", "accuracy_mean", "accuracy_std",
                "bytes_up_per_sample", "bytes_down_per_sample", "ratio_up", "snr_db",
                "client_params", "client_flops", "latency_ms", "pareto")
    for r in rows:
        for key in required:
            assert key in r, key
        assert 0.0 <= r["accuracy_mean"] <= 1.0
        assert set(r["latency_ms"]) >= {"rpi4", "rpi5", "jetson-nano", "jetson-orin-nano",
                                        "phone-midrange"}

    # bytes strictly decrease fp32 -> q8 -> q4 -> q2 for the same cut; fp32 is the 1x baseline
    for cut in CUTS:
        mine = {r["codec"]: r for r in rows if r["cut"] == cut}
        sizes = [mine[c]["bytes_up_per_sample"] for c in CODECS]
        assert all(a > b for a, b in zip(sizes, sizes[1:], strict=False)), (cut, sizes)
        assert mine["fp32"]["ratio_up"] == pytest.approx(1.0)
        assert mine["fp32"]["snr_db"] is None                     # lossless: inf -> null
        assert mine["q8+zstd"]["snr_db"] > mine["q2+zstd"]["snr_db"]

    # frontier rows are not dominated by any row
    pts = [(r["accuracy_mean"], r["bytes_per_sample"]) for r in rows]
    assert any(r["pareto"] for r in rows)
    for r, p in zip(rows, pts, strict=True):
        if r["pareto"]:
            assert not any(dominates(q, p) for q in pts)

    # recommendations respect the budget, or say why there is none
    ref = doc["baseline"]["accuracy"]
    assert ref == max(r["accuracy_mean"] for r in rows if r["codec"] == "fp32")
    recs = doc["recommendations"]
    assert len(recs) == len(doc["devices"]) * len(doc["links"])
    for rec in recs:
        if rec["found"]:
            assert rec["drop_points"] <= MAX_DROP + 1e-9
            assert rec["accuracy_mean"] >= ref - MAX_DROP / 100 - 1e-12
            assert rec["latency_ms"] is not None
        else:
            assert rec["reason"]
    lora = [r for r in recs if r["link"] == "lora"]
    # a 32-sample training frame never fits a 222-byte LoRa payload
    assert lora and all(not r["found"] and "max payload" in r["reason"] for r in lora)
    assert any(r["found"] for r in recs if r["link"] == "wifi")

    # FL comparison: FedAvg = params x 4 B x 2; SplitNN fp32 = cut elements x 4 x n x 2
    fl = doc["fl_comparison"]
    for row in fl["rows"]:
        assert row["fedavg_bytes"] == fl["model_params"] * 4 * 2
        n = fl["total_samples"] / row["clients"]
        assert row["splitnn_bytes_fp32"] == pytest.approx(fl["cut_elements"] * 4 * n * 2)

    # the same command again reuses every cell
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["cache"] == {"trained_cells": 0, "reused_cells": len(rows)}
