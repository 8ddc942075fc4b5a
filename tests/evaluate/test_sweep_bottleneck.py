"""The learned bottleneck as a sweep axis: ``bn:D:BITS`` entries of ``--codecs`` (positions are
the cuts), ratios against the fp32 cut without bottleneck at the same position."""

from __future__ import annotations

import pytest

from edgesplit.errors import ConfigError
from edgesplit.evaluate.sweep import SweepArgs, check_cell_codec, run_sweep, split_cell_codec


def test_bottleneck_entries_name_their_codecs() -> None:
    assert split_cell_codec("bn:16:2") == ("16:2", "fq:2,ans", "q4:stochastic")
    assert split_cell_codec("bn:8:1:0/q8") == ("8:1:0", "fq:1,ans", "q8")
    assert split_cell_codec("q4+zstd/q8") == (None, "q4+zstd", "q8")
    assert split_cell_codec("fp32") == (None, "fp32", None)


@pytest.mark.parametrize(
    ("entry", "message"),
    [("bn:16:9", "bits must be 1..8"), ("bn:x", "must look like D"), ("q5", "unknown codec"),
     ("bn:16:2/q5", "unknown codec")],
)
def test_bad_entries_are_refused_before_training(entry: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_cell_codec(entry)
    trained: list[object] = []
    with pytest.raises(ConfigError, match=message):
        run_sweep(SweepArgs(codecs=["fp32", entry], cuts=["relu1"], seeds=1, epochs=1),
                  train_fn=trained.append, on_progress=None, write_report=False)
    assert trained == []  # nothing trained before the refusal


@pytest.mark.slow
def test_bottleneck_cells_train_and_compare_to_the_fp32_cut(tmp_path) -> None:
    args = SweepArgs(codecs=["fp32", "bn:8:2"], cuts=["relu1", "relu2"], seeds=2, epochs=2,
                     out=str(tmp_path), devices=["rpi4"], links=["wifi"])
    rows = {(r["cut"], r["codec"]): r for r in run_sweep(args, on_progress=None).rows}
    for cut in ("relu1", "relu2"):
        plain, neck = rows[(cut, "fp32")], rows[(cut, "bn:8:2")]
        assert neck["bottleneck"] == "8:2" and plain["bottleneck"] is None
        assert neck["grad_codec"] == "q4:stochastic"
        # one reference: the fp32 cut at the same position, measured in the bottleneck run
        assert neck["bytes_up_fp32_per_sample"] == pytest.approx(
            plain["bytes_up_per_sample"], rel=0.01)
        assert neck["ratio_up"] == pytest.approx(
            neck["bytes_up_fp32_per_sample"] / neck["bytes_up_per_sample"])
        # 8 two-bit codes a sample against the cut's fp32 values (128 or 64 of them)
        assert neck["ratio_up"] > 20
        assert len(neck["accuracies"]) == 2
