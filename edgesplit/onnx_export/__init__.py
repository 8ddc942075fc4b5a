"""Client segment ▸ ONNX bundle (torch + onnx): export, parity check, int8, device fit.

>>> from edgesplit.onnx_export import ExportOptions, SplitModel, export_bundle
>>> model = SplitModel.from_trained(run_training(TrainSpec(epochs=3)))    # doctest: +SKIP
>>> options = ExportOptions(weights="int8", device="rpi4")                  # doctest: +SKIP
>>> report = export_bundle(model, "export/out/digits", options)           # doctest: +SKIP

The device side reads the result with :func:`edgesplit.edge.bundle.load_bundle` (torch-free).
"""

from edgesplit.onnx_export.fit import DeviceFit, MemoryEstimate, device_fit, estimate_memory
from edgesplit.onnx_export.int8 import ArrayCalibrationReader, Int8Result
from edgesplit.onnx_export.parity import ParityResult, check_parity
from edgesplit.onnx_export.pipeline import (
    DEFAULT_OUT_ROOT,
    ExportOptions,
    ExportReport,
    default_name,
    export_bundle,
    server_dir,
)
from edgesplit.onnx_export.segment import (
    DEFAULT_OPSET,
    MIN_OPSET,
    ExportedSegment,
    check_model,
    export_segment,
)
from edgesplit.onnx_export.source import SplitModel

__all__ = [
    "DEFAULT_OPSET",
    "DEFAULT_OUT_ROOT",
    "MIN_OPSET",
    "ArrayCalibrationReader",
    "DeviceFit",
    "ExportOptions",
    "ExportReport",
    "ExportedSegment",
    "Int8Result",
    "MemoryEstimate",
    "ParityResult",
    "SplitModel",
    "check_model",
    "check_parity",
    "default_name",
    "device_fit",
    "estimate_memory",
    "export_bundle",
    "export_segment",
    "server_dir",
]
