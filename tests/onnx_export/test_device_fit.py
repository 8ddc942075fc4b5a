"""The device-fit check (onnx_export/fit.py) against numbers worked out by hand."""

from __future__ import annotations

import pytest

from edgesplit.devices import MIB, DeviceProfile
from edgesplit.errors import ExportError
from edgesplit.onnx_export.fit import (
    RUNTIME_OVERHEAD_MIB,
    check_opset_fits,
    device_fit,
    estimate_memory,
)

BOARD = DeviceProfile(name="board", description="a test board", effective_gflops_fp32=2.0,
                      effective_gflops_int8=8.0, memory_mib=128, max_onnx_opset=17,
                      execution_provider="CPUExecutionProvider", onnxruntime_version="1.16")


def test_memory_estimate() -> None:
    m = estimate_memory(model_bytes=MIB, input_bytes=256, peak_activation_bytes=4_096, batch=8)
    assert m.activations == 8 * (256 + 2 * 4_096) == 67_584
    assert m.runtime == 64 * MIB == RUNTIME_OVERHEAD_MIB * MIB
    assert m.total == MIB + 67_584 + 64 * MIB


def test_a_fitting_export_and_its_latency() -> None:
    memory = estimate_memory(MIB, 256, 4_096, batch=8)
    fit = device_fit(BOARD, opset=17, memory=memory, flops=4_000_000, precision="fp32")
    assert fit.fits and fit.reasons == []
    assert fit.estimated_ms_per_sample == pytest.approx(2.0)   # 4 MFLOP / 2 GFLOP/s
    int8 = device_fit(BOARD, opset=17, memory=memory, flops=4_000_000, precision="int8")
    assert int8.estimated_ms_per_sample == pytest.approx(0.5)  # 4 MOP / 8 GOP/s
    assert fit.memory == {"weights": MIB, "activations": 67_584, "runtime": 64 * MIB,
                          "batch": 8}


def test_too_new_an_opset_and_too_little_memory_are_both_named() -> None:
    memory = estimate_memory(80 * MIB, 256, 4_096, batch=1)   # 80 + 64 MiB > 128 MiB
    fit = device_fit(BOARD, opset=18, memory=memory, flops=1, precision="fp32")
    assert not fit.fits
    assert fit.reasons[0] == "opset 18 > device max 17"
    assert fit.reasons[1].startswith("needs ~144.0 MiB (weights 80.00 + activations at batch 1 ")
    assert fit.reasons[1].endswith("device has 128 MiB")


def test_opset_refused_before_exporting() -> None:
    check_opset_fits(BOARD, 17)
    with pytest.raises(ExportError, match=r"runs ONNX opset ≤ 17 \(onnxruntime 1\.16\), the "
                                          r"export needs opset 18; pass --opset 17"):
        check_opset_fits(BOARD, 18)
