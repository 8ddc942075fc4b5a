"""int8 quantization drops the quantizer's root-logger hints without muting anyone else."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgesplit.onnx_export.int8 import _QUANTIZER_DIR, quantize, quantizer_hints_dropped


def _linear_relu() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3)).astype("float32"),
                                name="w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _record(pathname: str, level: int) -> logging.LogRecord:
    return logging.LogRecord("root", level, pathname, 1, "msg", None, None)


def test_quantize_drops_the_hint_and_restores_the_root_logger(
        caplog: pytest.LogCaptureFixture) -> None:
    root = logging.getLogger()
    level, filters = root.level, list(root.filters)
    caplog.set_level(logging.INFO)
    x = np.random.default_rng(1).normal(size=(16, 4)).astype("float32")
    quantized = quantize(_linear_relu(), x, input_name="x", per_channel=False)
    assert any(n.op_type == "QuantizeLinear" for n in quantized.graph.node)
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()]
    assert (root.level, root.filters) == (logging.INFO, filters)
    root.setLevel(level)


def test_others_keep_logging_on_the_root_logger_meanwhile(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    root = logging.getLogger()
    with quantizer_hints_dropped():
        assert root.level == logging.INFO    # not raised to ERROR for the whole process
        logging.warning("a server thread's warning")   # root-logger record from elsewhere
        logging.getLogger("edgesplit.somewhere").info("a module's info")
        (hint_filter,) = [f for f in root.filters if type(f).__name__ == "QuantizerHintFilter"]
        assert not hint_filter.filter(_record(f"{_QUANTIZER_DIR}/quantize.py", logging.WARNING))
        assert hint_filter.filter(_record(f"{_QUANTIZER_DIR}/quantize.py", logging.ERROR))
        assert hint_filter.filter(_record("/elsewhere/quantize.py", logging.WARNING))
    messages = [r.getMessage() for r in caplog.records]
    assert "a server thread's warning" in messages and "a module's info" in messages
    assert not [f for f in root.filters if type(f).__name__ == "QuantizerHintFilter"]
