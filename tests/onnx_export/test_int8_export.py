"""int8 export: static QDQ quantization calibrated on training data, its accuracy change measured
against the fp32 client in front of the same server segment."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edgesplit.edge.bundle import load_bundle
from edgesplit.errors import ExportError
from edgesplit.onnx_export import ExportOptions, SplitModel, export_bundle


@pytest.fixture(scope="module")
def trained(digits_trained):
    return digits_trained


@pytest.fixture(scope="module")
def report(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "digits-int8"
    return export_bundle(SplitModel.from_trained(trained), out,
                         ExportOptions(weights="int8", device="rpi4"))


def _accuracy_through_server(cut: np.ndarray, trained) -> float:
    """Test accuracy of the trained server segment on the cut tensors ``cut``."""
    with torch.no_grad():
        logits = trained.server_segment.eval()(torch.from_numpy(cut))
    return float((logits.argmax(1).numpy() == trained.dataset.y_test).mean())


def test_int8_accuracy_change_is_recorded_and_small(report, trained):
    m = report.manifest
    assert m["weights"] == "int8" and m["name"] == "digits-vanilla-int8"
    assert m["int8_accuracy_fp32"] == pytest.approx(trained.result.accuracy)
    # measured here, independently: the shipped int8 file in front of the server segment
    n = len(trained.dataset.y_test)
    int8 = _accuracy_through_server(load_bundle(report.bundle).run(trained.dataset.x_test),
                                    trained)
    assert m["int8_accuracy"] == pytest.approx(int8, abs=1.5 / n)   # one sample may flip
    assert m["int8_accuracy_change"] == pytest.approx(
        (int8 - trained.result.accuracy) * 100, abs=150 / n)
    # int8 on digits stays within a few points of fp32
    assert abs(m["int8_accuracy_change"]) <= 3.0
    assert 0 < m["int8_cut_max_abs"] < 1.0
    assert m["int8"]["calibration_samples"] == 1024 and m["int8"]["format"] == "QDQ"
    assert m["int8"]["test_samples"] == len(trained.dataset.y_test)
    # the parity shown is the shipped int8 file's, not the fp32 export's
    parity = m["parity"]
    assert parity["model"] == "int8" and parity["passed"]
    assert parity["max_abs"] > 100 * parity["fp32"]["max_abs"]
    assert parity["fp32"]["model"] == "fp32" and parity["fp32"]["passed"]
    assert 0 < parity["max_abs"] <= 1.0 and "accuracy change" in parity["criterion"]
    assert m["device"]["precision"] == "int8" and m["device"]["fits"]


def test_int8_model_is_quantized_checked_and_smaller(report, trained):
    path = report.bundle / "client.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer)
    # fp32 bytes of the segment's weights and buffers; int8 weights take a quarter, per-channel
    # scales, zero points and the int32 bias add a little
    state = trained.client_segments[-1].state_dict().values()
    fp32_bytes = sum(4 * t.numel() for t in state if t.is_floating_point())
    assert path.stat().st_size < 0.6 * fp32_bytes


def test_int8_bundle_runs_close_to_fp32(report, trained):
    bundle = load_bundle(report.bundle)
    x = trained.dataset.x_test
    with torch.no_grad():
        want = trained.client_segments[-1].eval()(torch.from_numpy(x)).numpy()
    got = bundle.run(x)
    assert got.dtype == np.float32 and got.shape == want.shape
    # the manifest's cut error is the largest over the test split: measured here, the same
    assert np.abs(got - want).max() == pytest.approx(report.manifest["int8_cut_max_abs"],
                                                     rel=1e-3)


def test_int8_needs_data(trained, tmp_path):
    model = SplitModel.from_trained(trained)
    model.dataset = None
    with pytest.raises(ExportError, match="int8 needs the training data"):
        export_bundle(model, tmp_path / "x", ExportOptions(weights="int8"))
