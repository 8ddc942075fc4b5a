"""``export_trainable``: forward/backward ONNX graphs checked against torch autograd."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgesplit.edge.bundle import load_bundle
from edgesplit.errors import ExportError
from edgesplit.models import cnn2d, mlp
from edgesplit.onnx_export.source import SplitModel
from edgesplit.onnx_export.trainable import (
    BACKWARD_FILE,
    FORWARD_FILE,
    INFER_FILE,
    PARAMS_FILE,
    build_trainable,
    export_trainable,
)


def _split_model() -> SplitModel:
    torch.manual_seed(0)
    full = mlp((64,), 10)
    lower, server = full[:2], full[2:]
    return SplitModel(config="vanilla", lowers=[lower], server=server, head=None,
                      input_shape=(64,), num_classes=10, cuts=("relu1",), trained=False)


def test_export_writes_a_checked_trainable_bundle(tmp_path):
    model = _split_model()
    out = tmp_path / "bundle"
    manifest = export_trainable(model, out)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    section = manifest["trainable"]
    assert [p["name"] for p in section["params"]] == ["fc1.weight", "fc1.bias"]
    assert [p["shape"] for p in section["params"]] == [[128, 64], [128]]
    assert section["forward"]["outputs"][0] == "cut" and section["residuals"]
    assert section["backward"]["inputs"][-1] == "grad_cut"
    assert section["batch"]["policy"] == "dynamic"
    parity = section["parity"]
    assert parity["passed"] and parity["batch_sizes"] == [1, 7, 32] and parity["max_abs"] < 1e-4
    for name in (FORWARD_FILE, BACKWARD_FILE, INFER_FILE):
        onnx.checker.check_model(str(out / name), full_check=True)
    for name in (FORWARD_FILE, BACKWARD_FILE, INFER_FILE, PARAMS_FILE):
        assert manifest["sha256"][name] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    # an ordinary bundle too, with its server folder beside it
    assert load_bundle(out).config == "vanilla"
    assert (tmp_path / "bundle.server" / "server.pt").is_file()
    with np.load(out / PARAMS_FILE, allow_pickle=False) as params:
        np.testing.assert_array_equal(params["param_0"], model.lowers[0].fc1.weight.numpy(
            force=True))


def test_a_gradient_parity_failure_fails_the_export():
    """BatchNorm in training mode, decomposed at the capture batch size, bakes ``1/batch``
    into the graph: the cut and gradients are silently wrong at other batch sizes. The parity
    check catches it and nothing is returned."""
    torch.manual_seed(0)
    lower = nn.Sequential(OrderedDict([("fc", nn.Linear(64, 16)),
                                       ("bn", nn.BatchNorm1d(16, track_running_stats=False)),
                                       ("relu", nn.ReLU())]))
    samples = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    with pytest.raises(ExportError, match="gradient parity FAILED") as info:
        build_trainable(lower, samples, check_layers=False, batch_sizes=(2, 7, 32))
    assert len(str(info.value).splitlines()) == 1


def test_cnn_segments_train_with_a_dynamic_batch():
    """conv + max-pool: ``convolution_backward`` is rebuilt from two convolutions and the
    batch size baked into the capture (``view(x, [11, 1, 8, 8])``) is read from the input."""
    torch.manual_seed(0)
    lower = cnn2d((8, 8), 10)[:4]   # unsqueeze, conv1, relu1, pool1
    samples = np.random.default_rng(0).standard_normal((64, 8, 8)).astype(np.float32)
    files, section = build_trainable(lower, samples)
    assert section["parity"]["passed"] and section["parity"]["batch_sizes"] == [1, 7, 32]
    backward = onnx.load_from_string(files[BACKWARD_FILE])
    assert "Conv" in {n.op_type for n in backward.graph.node}   # the weight gradient
    assert backward.graph.input[-1].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_untrainable_layers_are_refused_by_name(tmp_path):
    torch.manual_seed(0)
    full = cnn2d((8, 8), 10)
    model = SplitModel(config="vanilla", lowers=[full[:7]], server=full[7:], head=None,
                       input_shape=(8, 8), num_classes=10, trained=False)
    refused = r"layer\(s\) pool2 \(AdaptiveAvgPool2d\) cannot be trained"
    with pytest.raises(ExportError, match=refused):
        export_trainable(model, tmp_path / "b")
    assert not (tmp_path / "b").exists()

    bn = nn.Sequential(OrderedDict([("fc", nn.Linear(4, 4)), ("bn", nn.BatchNorm1d(4))]))
    with pytest.raises(ExportError, match=r"bn \(BatchNorm1d\)"):
        build_trainable(bn, np.zeros((4, 4), np.float32))
