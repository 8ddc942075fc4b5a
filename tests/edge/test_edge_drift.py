"""Drift on the edge: the exporter records the training inputs' ranges in the manifest, the
device checks every batch against them and warns — once per N batches — when inputs leave them."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgesplit.data import load_dataset
from edgesplit.edge.bundle import MANIFEST_FILE, load_bundle, read_manifest
from edgesplit.edge.drift import DriftMonitor
from edgesplit.errors import ConfigError
from edgesplit.onnx_export import SplitModel, export_bundle
from edgesplit.train.checkpoint import load_checkpoint

DRIFT_LOG = "edgesplit.edge.drift"


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == DRIFT_LOG and r.levelno == logging.WARNING
    ]


@pytest.fixture(scope="module")
def with_data(vanilla, tmp_path_factory):
    """The vanilla checkpoint exported with its training data (ranges = the rows' min/max)."""
    model = SplitModel.from_checkpoint(load_checkpoint(vanilla.checkpoint), load_dataset("digits"))
    return export_bundle(model, tmp_path_factory.mktemp("drift") / "digits-vanilla").bundle


@pytest.fixture(params=["with_data", "without_data"])
def bundle_dir(request, vanilla, with_data):
    return with_data if request.param == "with_data" else vanilla.bundle


def test_export_records_the_training_ranges(vanilla, with_data):
    ranges = load_bundle(with_data).manifest["input_ranges"]
    assert ranges["samples"] == len(vanilla.x_train) and ranges["basis"] == "training rows"
    np.testing.assert_allclose(ranges["min"], vanilla.x_train.min(axis=0), rtol=1e-6)
    np.testing.assert_allclose(ranges["max"], vanilla.x_train.max(axis=0), rtol=1e-6)
    assert len(ranges["mean"]) == len(ranges["std"]) == vanilla.x_train.shape[1]
    # the statistics are the fitted standardization's (compiled into client.onnx)
    np.testing.assert_allclose(ranges["mean"], vanilla.x_train.mean(axis=0), atol=1e-4)


def test_without_data_the_range_is_mean_plus_minus_16_std(vanilla):
    ranges = load_bundle(vanilla.bundle).manifest["input_ranges"]  # exported without data
    assert ranges["samples"] == 0 and "mean ± 16 std" in ranges["basis"]
    mean, std = np.asarray(ranges["mean"]), np.asarray(ranges["std"])
    np.testing.assert_allclose(ranges["max"], mean + 16 * std)
    np.testing.assert_allclose(ranges["min"], mean - 16 * std)


def test_in_range_data_warns_nothing(vanilla, bundle_dir, caplog):
    bundle = load_bundle(bundle_dir)
    with caplog.at_level(logging.WARNING, logger=DRIFT_LOG):
        for start in range(0, len(vanilla.x_test), 32):
            bundle.run(vanilla.x_test[start : start + 32])
    assert _warnings(caplog) == []
    assert bundle.drift is not None and bundle.drift.drifted == 0
    assert bundle.drift.batches == -(-len(vanilla.x_test) // 32)


def test_data_times_16_warns_once_per_n_batches(vanilla, bundle_dir, caplog):
    bundle = load_bundle(bundle_dir)
    assert bundle.drift is not None
    x = (vanilla.x_test * 16).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger=DRIFT_LOG):
        for start in range(0, 5 * 32, 32):  # 5 drifting batches, well under DEFAULT_EVERY
            bundle.run(x[start : start + 32])
    lines = _warnings(caplog)
    assert len(lines) == 1, lines
    assert bundle.drift.drifted == 5
    line = lines[0]
    assert "\n" not in line and vanilla.bundle.name in line
    # names a feature, its recorded range and what was seen
    assert "input drift: feature " in line and "trained on [" in line and "seen [" in line
    assert "outside the training ranges" in line


def test_the_warning_repeats_after_every_batches():
    ranges = {"min": [0.0, 0.0], "max": [1.0, 10.0], "std": [0.3, 3.0]}
    monitor = DriftMonitor(ranges, "m", every=3)
    ok = np.array([[0.5, 9.0], [1.2, 0.0]], dtype=np.float32)  # 1.2: within the 25% margin
    bad = np.array([[0.5, 99.0]], dtype=np.float32)
    assert monitor.check(ok) is None
    drifts = [monitor.check(bad) for _ in range(7)]
    assert all(d is not None and d.features == (1,) for d in drifts)
    assert drifts[0] is not None and (drifts[0].seen_high[0], drifts[0].high[0]) == (99.0, 10.0)
    assert monitor.warnings == 3  # batches 2, 5, 8 of 8
    assert monitor.drifted == 7


def test_images_are_checked_per_channel_and_nan_counts():
    ranges = {"min": [[[0.0]], [[0.0]]], "max": [[[1.0]], [[255.0]]]}
    monitor = DriftMonitor(ranges, "img", sample_ndim=3)
    x = np.zeros((2, 2, 4, 4), dtype=np.float32)
    x[:, 1] = 200.0
    assert monitor.check(x) is None
    x[1, 0, 2, 2] = np.nan
    drift = monitor.check(x)
    assert drift is not None and drift.features == (0,) and drift.unit == "channel"
    assert "channel 0 trained on [0, 1]" in drift.describe()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"min": [1.0] * 64, "max": [0.0] * 64}, r"'input_ranges.min' exceeds 'input_ranges.max'"),
        ({"min": [0.0] * 3}, r"'input_ranges.min' has shape \(3,\), which does not broadcast"),
        ({"max": None}, r"'input_ranges.max' holds non-finite values|must be a \(nested\) list"),
        ({"std": [-1.0] * 64}, r"'input_ranges.std' must be ≥ 0"),
    ],
)
def test_invalid_ranges_are_refused_on_load(vanilla, tmp_path, change, message):
    copy = tmp_path / "bundle"
    shutil.copytree(vanilla.bundle, copy)
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    manifest["input_ranges"].update(change)
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=message):
        read_manifest(copy / MANIFEST_FILE)
    with pytest.raises(ConfigError, match=message):
        load_bundle(copy)


def test_the_edge_cli_says_it_once_in_stderr(vanilla, serve, token, tmp_path):
    """``edgesplit client`` on inputs ×16: one warning line, the run still completes."""
    served = serve(vanilla)
    npz = tmp_path / "x16.npz"
    np.savez(
        npz,
        x=vanilla.x_train * 16,
        y=vanilla.y_train,
        x_test=vanilla.x_test * 16,
        y_test=vanilla.y_test,
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgesplit.cli.main",
            "client",
            "--bundle",
            str(vanilla.bundle),
            "--server",
            served.address,
            "--token",
            token,
            "--data",
            str(npz),
            "--mode",
            "infer",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    drift_lines = [line for line in done.stderr.splitlines() if "input drift" in line]
    assert len(drift_lines) == 1, done.stderr
    assert json.loads(done.stdout)["samples"] == len(vanilla.x_test)
