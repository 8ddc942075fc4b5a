"""A user model with a custom forward (residual blocks, a reshape of the input) cut at a named
module: it trains, saves and reloads, and exports with parity at opset 18 and 16."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import fx

from edgesplit.edge.bundle import load_bundle
from edgesplit.models import build_model
from edgesplit.onnx_export import ExportOptions, SplitModel, export_bundle
from edgesplit.train.checkpoint import load_checkpoint, save_checkpoint
from edgesplit.train.engine import run_training
from edgesplit.train.spec import TrainSpec


@pytest.fixture(scope="module")
def trained(resnet_file):
    return run_training(TrainSpec(model=f"{resnet_file}:build", cut="block1", epochs=1,
                                  codec="q8+zstd"))


def test_residual_model_trains_through_the_cut(trained):
    client, server = trained.client_segments[-1], trained.server_segment
    # the client segment is (input standardization, the fx-cut lower part of the model)
    lower = client.get_submodule("lower")
    assert isinstance(lower, fx.GraphModule) and isinstance(server, fx.GraphModule)
    assert "block1.conv2.weight" in lower.state_dict()
    assert "block2.conv1.weight" in server.state_dict()
    # both sides moved away from the initial weights (same seed → same initialisation)
    torch.manual_seed(trained.spec.seed)
    fresh = build_model(trained.spec.model, (64,), 10)
    assert not torch.equal(fresh.stem.weight, lower.get_submodule("stem").weight)
    assert not torch.equal(fresh.head.weight, server.get_submodule("head").weight)
    assert np.isfinite(trained.result.history[-1]["loss"])


def test_checkpoint_reloads_the_same_segments(trained, tmp_path):
    save_checkpoint(tmp_path / "ck", trained)
    loaded = load_checkpoint(tmp_path / "ck")   # rebuilt from the factory, no example batch
    x = torch.from_numpy(trained.dataset.x_test[:5])
    lower, server = trained.client_segments[-1].eval(), trained.server_segment.eval()
    with torch.no_grad():
        want = server(lower(x))
        got = loaded.parts.server.eval()(loaded.parts.lowers[0].eval()(x))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("opset", [18, 16])
def test_custom_forward_segment_exports_with_parity(trained, tmp_path, opset):
    report = export_bundle(SplitModel.from_trained(trained), tmp_path / f"b{opset}",
                           ExportOptions(opset=opset))
    model = onnx.load(str(report.bundle / "client.onnx"))
    assert model.opset_import[0].version == opset or any(
        o.version == opset for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert report.manifest["parity"]["passed"]
    assert report.manifest["cut_shape"] == [8, 8, 8]
    x = trained.dataset.x_test[:7]
    with torch.no_grad():
        want = trained.client_segments[-1].eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(load_bundle(report.bundle).run(x), want, atol=1e-5)
    assert Path(report.server / "server.pt").is_file()
