"""A CNN through the whole deployment path: trained on 1×8×8 digit images, exported (fp32 and
int8), checked against torch, and run by the torch-free edge runtime against a real gRPC server.
Until this test only the digits MLP took that path (the CNN export ran only in a benchmark)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from edgesplit.data import load_dataset
from edgesplit.edge.bundle import load_bundle
from edgesplit.edge.runtime import EdgeClient
from edgesplit.onnx_export import ExportOptions, SplitModel, export_bundle
from edgesplit.split.profile import profile_segment
from edgesplit.train.checkpoint import load_checkpoint
from edgesplit.transport.grpc_client import GrpcTransport


def _client_segment(exported: Any) -> torch.nn.Module:
    return load_checkpoint(exported.checkpoint).parts.lowers[-1].eval()


def test_cnn_bundle_matches_torch_and_its_profile(cnn: Any) -> None:
    bundle = load_bundle(cnn.bundle)
    m = bundle.manifest
    onnx.checker.check_model(str(cnn.bundle / "client.onnx"), full_check=True)
    assert m["cuts"] == ["pool1"] and m["parity"]["passed"]
    segment = _client_segment(cnn)
    x = cnn.x_test[:37]                       # a batch size the export never saw
    with torch.no_grad():
        want = segment(torch.from_numpy(x)).numpy()
    got = bundle.run(x)
    assert got.shape == (37, 16, 4, 4) == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    # the input standardisation: one op per element, 64; conv1 3×3 from 1 to 16 channels on
    # 8×8: 2·9·(16·8·8) = 18 432; relu 1 024; max-pool 16·4·4 = 256
    assert m["client"]["flops_per_sample"] == 64 + 18_432 + 1_024 + 256
    assert m["client"]["flops_per_sample"] == profile_segment(segment, (1, 8, 8)).flops


def test_cnn_edge_runtime_infers_over_grpc(cnn: Any, serve: Any, token: str) -> None:
    served = serve(cnn)
    bundle = load_bundle(cnn.bundle)
    with GrpcTransport(served.address, token) as transport:
        report = EdgeClient(bundle, transport, mode="infer").run(cnn.x_test, cnn.y_test,
                                                                 on_progress=None)
    assert report.samples == len(cnn.y_test)
    # the same model as the in-process run, with q8 on the wire: within a point of it
    assert report.accuracy == pytest.approx(cnn.accuracy, abs=0.01)
    assert cnn.accuracy > 0.8


def test_cnn_int8_export_runs_on_the_edge(cnn: Any, serve: Any, token: str,
                                          tmp_path: Path) -> None:
    checkpoint = load_checkpoint(cnn.checkpoint)
    data = load_dataset(str(cnn.npz))
    report = export_bundle(SplitModel.from_checkpoint(checkpoint, data), tmp_path / "int8",
                           ExportOptions(weights="int8", name="digits-cnn-int8"))
    model = onnx.load(str(report.bundle / "client.onnx"))
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= {n.op_type for n in model.graph.node}
    served = serve(cnn)
    with GrpcTransport(served.address, token) as transport:
        edge = EdgeClient(load_bundle(report.bundle), transport, mode="infer").run(
            cnn.x_test, cnn.y_test, on_progress=None)
    # the edge run reproduces the accuracy the exporter measured for int8
    assert edge.accuracy == pytest.approx(report.manifest["int8_accuracy"], abs=0.01)
    assert abs(report.manifest["int8_accuracy_change"]) <= 3.0
