"""The parity check's absolute tolerance grows with the tensor's scale: fp32 kernels that sum in
another order differ by ulps of the summed terms, so an element near zero of a tensor whose values
reach thousands is legitimately off by more than an absolute 1e-5 — and a real error still fails.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from edgesplit.onnx_export.parity import FP32_ATOL, FP32_RTOL, check_parity


class Scale(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1000.0


def _scale_plus(offset: float) -> bytes:
    """An ONNX model computing ``x * 1000 + offset`` (the torch module above, off by offset)."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"]), helper.make_node("Add", ["y", "b"], ["cut"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("cut", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor("k", TensorProto.FLOAT, [], [1000.0]),
            helper.make_tensor("b", TensorProto.FLOAT, [], [offset]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


@pytest.fixture
def samples() -> np.ndarray:
    x = np.random.default_rng(0).uniform(-3, 3, (64, 4)).astype(np.float32)
    x[0, 0] = 0.0  # an exact zero: only the scaled absolute tolerance covers it
    return x


def test_an_error_small_against_the_scale_passes(samples):
    # 5e-4 on values up to 3000: 1.7e-7 of the scale, but 50x the absolute 1e-5
    result = check_parity(Scale(), _scale_plus(5e-4), samples, batch_sizes=(1, 64))
    assert result.passed
    assert result.max_abs == pytest.approx(5e-4, rel=0.2) and result.max_abs > FP32_ATOL
    assert (result.atol, result.rtol) == (FP32_ATOL, FP32_RTOL)


def test_an_error_large_against_the_scale_fails(samples):
    result = check_parity(Scale(), _scale_plus(0.5), samples, batch_sizes=(1, 64))
    assert not result.passed and result.max_abs == pytest.approx(0.5, rel=0.01)


def test_values_below_one_keep_the_absolute_tolerance(samples):
    small = samples * 1e-6  # outputs ≤ 3e-3: the scale is 1
    assert check_parity(Scale(), _scale_plus(5e-6), small, batch_sizes=(64,)).passed
    result = check_parity(Scale(), _scale_plus(5e-5), small, batch_sizes=(64,))
    assert not result.passed  # 5e-5 > 1e-5 · 1 + 1e-4 · |torch|
    assert result.max_abs == pytest.approx(5e-5, rel=0.05)
