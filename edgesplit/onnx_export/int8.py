"""Static int8 quantization of an exported segment and what it costs in accuracy.

ONNX Runtime's ``quantize_static`` writes QDQ models (QuantizeLinear/DequantizeLinear pairs
around int8 weights, standard ai.onnx ops only), calibrated with MinMax over sample training
data fed by a :class:`CalibrationDataReader`. The quantized model still takes and returns
float32, so the bundle's interface is unchanged.

Parity for int8 is not element-wise closeness (int8 rounding is far beyond fp32 tolerances):
it is the change of test accuracy when the int8 client replaces the fp32 one in front of the
same server segment, plus the largest error of the cut tensor.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime.quantization as _ort_quantization
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from edgesplit.errors import ExportError
from edgesplit.onnx_export.parity import ort_session

#: Default largest accuracy drop (percentage points) an int8 export may cause.
DEFAULT_MAX_DROP = 2.0
#: Calibration batch size (MinMax only needs every sample once; batches keep memory flat).
CALIBRATION_BATCH = 32


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds ``samples`` to the calibrator in batches under ``input_name``."""

    def __init__(self, input_name: str, samples: np.ndarray, batch: int = CALIBRATION_BATCH
                 ) -> None:
        self.input_name = input_name
        self.samples = np.ascontiguousarray(samples, dtype=np.float32)
        self.batch = batch
        self._it: Iterator[dict[str, np.ndarray]] = self._batches()

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self.samples), self.batch):
            yield {self.input_name: self.samples[start:start + self.batch]}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self._batches()


@dataclass
class Int8Result:
    """What int8 weights did to the model.

    Attributes
    ----------
    accuracy_fp32: test accuracy with the fp32 client segment (server segment in torch).
    accuracy: the same with the int8 client segment.
    accuracy_change: ``accuracy - accuracy_fp32`` in percentage points (negative = worse).
    cut_max_abs: largest |int8 cut - fp32 cut| over the test split.
    per_channel: per-channel weight scales were kept (they gave the smaller cut error).
    calibration_samples, test_samples: how many samples calibrated and measured.
    format, activation_type, weight_type: the quantization recipe.
    """

    accuracy_fp32: float
    accuracy: float
    accuracy_change: float
    cut_max_abs: float
    per_channel: bool
    calibration_samples: int
    test_samples: int
    format: str = "QDQ"
    activation_type: str = "QInt8"
    weight_type: str = "QInt8"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


#: Where ONNX Runtime's quantizer lives: its records are recognised by their source file.
_QUANTIZER_DIR = str(Path(_ort_quantization.__file__).resolve().parent)


class QuantizerHintFilter(logging.Filter):
    """Drops the quantizer's below-ERROR records, and only those.

    ``quantize_static`` logs hints such as "consider pre-processing" with ``logging.warning``,
    i.e. on the root logger; the exporter already ran ONNX optimizations, so they are noise.
    A filter on the root logger sees only records logged on the root logger itself, and this
    one passes every record not written by the quantizer's own files: other threads and
    modules keep logging while a quantization runs (raising the root level would mute them).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not record.pathname.startswith(_QUANTIZER_DIR)


@contextmanager
def quantizer_hints_dropped() -> Iterator[None]:
    """While active, the root logger drops the quantizer's hints (:class:`QuantizerHintFilter`)."""
    root = logging.getLogger()
    hint_filter = QuantizerHintFilter()
    root.addFilter(hint_filter)
    try:
        yield
    finally:
        root.removeFilter(hint_filter)


def quantize(model: onnx.ModelProto, calibration: np.ndarray, *, input_name: str,
             per_channel: bool) -> onnx.ModelProto:
    """Static int8 QDQ quantization of ``model`` calibrated on ``calibration``.

    Raises
    ------
    ExportError: ONNX Runtime's quantizer failed.
    """
    with tempfile.TemporaryDirectory(prefix="edgesplit-int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(model, str(src), save_as_external_data=False)
        try:
            with quantizer_hints_dropped():
                quantize_static(
                    str(src), str(dst), ArrayCalibrationReader(input_name, calibration),
                    quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, use_external_data_format=False,
                )
        except Exception as exc:   # the quantizer raises plain Exceptions and ORT errors
            raise ExportError(f"int8 quantization failed: {type(exc).__name__}: {exc}") from None
        return onnx.load_model(str(dst), load_external_data=False)


def quantize_best(model: onnx.ModelProto, calibration: np.ndarray, validation: np.ndarray,
                  reference: np.ndarray, *, input_name: str
                  ) -> tuple[onnx.ModelProto, bool]:
    """Quantize per tensor and per channel; keep the one whose cut error on ``validation``
    (against the fp32 ``reference`` outputs) is smaller. Per-channel scales help layers whose
    output channels have very different weight ranges and cost a few bytes each; where they
    do not help, per tensor is simpler for small runtimes.

    Returns (int8 model, per_channel).
    """
    best: tuple[float, onnx.ModelProto, bool] | None = None
    for per_channel in (False, True):
        candidate = quantize(model, calibration, input_name=input_name, per_channel=per_channel)
        (got,) = ort_session(candidate.SerializeToString()).run(None, {input_name: validation})
        error = float(np.mean((got.astype(np.float64) - reference) ** 2))
        if best is None or error < best[0]:
            best = (error, candidate, per_channel)
    if best is None:   # unreachable: the loop runs twice; keeps the type checker honest
        raise ExportError("int8 quantization produced no model")
    return best[1], best[2]


def int8_accuracy(run_int8: Callable[[np.ndarray], np.ndarray],
                  run_fp32: Callable[[np.ndarray], np.ndarray],
                  predict: Callable[[np.ndarray, np.ndarray], np.ndarray],
                  x_test: np.ndarray, y_test: np.ndarray, *, batch: int = 256
                  ) -> tuple[float, float, float]:
    """Accuracy of (fp32 cut → rest) and (int8 cut → rest), and the largest cut error.

    Parameters
    ----------
    run_int8, run_fp32: the exported party's cut tensor for a batch of full samples.
    predict: ``(full samples, this party's cut) -> class ids`` through everything after the
        cut (other parties, codec, server segment, head).
    x_test, y_test: the test split.

    Returns (accuracy fp32, accuracy int8, max abs cut error).
    """
    correct_fp32 = correct_int8 = 0
    max_abs = 0.0
    for start in range(0, len(y_test), batch):
        x, y = x_test[start:start + batch], y_test[start:start + batch]
        a32, a8 = run_fp32(x), run_int8(x)
        max_abs = max(max_abs, float(np.abs(a8 - a32).max(initial=0.0)))
        correct_fp32 += int((predict(x, a32) == y).sum())
        correct_int8 += int((predict(x, a8) == y).sum())
    n = max(len(y_test), 1)
    return correct_fp32 / n, correct_int8 / n, max_abs
