"""One torch segment ▸ one self-contained ONNX model.

Opset 18 and newer: the torch.export-based exporter (``dynamo=True``). Older opsets, for devices
with an old ONNX Runtime (Jetson Nano: 1.11, opset ≤ 16, IR ≤ 8): the TorchScript-based exporter,
which writes them directly; onnx's version converter does not down-convert 18 → 16 reliably.
"""

from __future__ import annotations

import copy
import io
import logging
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgesplit.edge.bundle import BATCH
from edgesplit.errors import ExportError

log = logging.getLogger(__name__)

#: Lowest opset of the torch.export-based exporter (older opsets would go through onnx's
#: version converter, which drops ops it cannot down-convert).
MIN_OPSET = 18
DEFAULT_OPSET = 18
#: Lowest opset the TorchScript-based exporter writes for us (13: per-channel QuantizeLinear
#: for int8, and every ONNX Runtime since 1.6 reads it).
LEGACY_MIN_OPSET = 13


@dataclass
class ExportedSegment:
    """An exported segment and what the exporter said on the way.

    Attributes
    ----------
    model: the checked ONNX model (all weights inline).
    input_name, output_name: graph input and output names.
    output_shape: per-sample output shape (no batch axis).
    warnings: unique warning messages from the exporter (for ``--verbose`` and the report).
    """

    model: onnx.ModelProto
    input_name: str
    output_name: str
    output_shape: list[int]
    warnings: list[str] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        return self.model.SerializeToString()


def max_supported_opset() -> int:
    """Newest ai.onnx opset the installed ``onnx`` package knows."""
    return int(onnx.defs.onnx_opset_version())


def check_opset(opset: int) -> None:
    """Raise :class:`ExportError` unless ``opset`` is one this exporter can write."""
    top = max_supported_opset()
    if not LEGACY_MIN_OPSET <= opset <= top:
        raise ExportError(f"opset {opset} is outside what the exporters write: "
                          f"{LEGACY_MIN_OPSET}..{MIN_OPSET - 1} (TorchScript-based exporter) or "
                          f"{MIN_OPSET}..{top} (torch.export-based, onnx {onnx.__version__})")


def exporter_name(opset: int) -> str:
    """Which exporter writes ``opset`` (recorded in the manifest)."""
    if opset >= MIN_OPSET:
        return "torch.onnx.export(dynamo=True)"
    return "torch.onnx.export(dynamo=False)"


def ir_version_for(opset: int) -> int:
    """The oldest ONNX IR version that can carry ``opset`` (16 → 8): what old runtimes read."""
    return int(onnx.helper.find_min_ir_version_for(
        [onnx.helper.make_opsetid("", opset)], ignore_unknown=True))


def export_segment(segment: nn.Module, example: np.ndarray, *, opset: int = DEFAULT_OPSET,
                   input_name: str = "x", output_name: str = "cut",
                   metadata: dict[str, str] | None = None) -> ExportedSegment:
    """Export ``segment`` with a dynamic batch axis: ``torch.onnx.export(dynamo=True)`` for
    opset ≥ 18, the TorchScript-based exporter (``dynamo=False``) below, with the IR version
    lowered to the oldest that carries the opset (opset 16 → IR 8).

    Parameters
    ----------
    segment:
        The module to export; it is copied and put in eval mode (the caller's stays as it was).
    example:
        Sample inputs, float32, shape ``(n, *sample shape)`` with ``n ≥ 2``: a batch of one
        would let torch.export specialise the batch axis to 1.
    opset:
        ai.onnx opset (``LEGACY_MIN_OPSET`` or newer).
    input_name, output_name:
        Names of the graph input and output.
    metadata:
        Extra ``metadata_props`` written into the model (string to string).

    Raises
    ------
    ExportError
        The exporter failed (message names the step and the first line of the cause), or the
        result is not a valid, self-contained single-input single-output ONNX model.
    """
    check_opset(opset)
    if example.ndim < 2 or example.shape[0] < 2:
        raise ExportError(f"export needs an example batch of at least 2 samples, got shape "
                          f"{example.shape}")
    module = copy.deepcopy(segment).eval()
    x = torch.from_numpy(np.ascontiguousarray(example[:2], dtype=np.float32))
    if opset < MIN_OPSET:
        model, caught = _export_torchscript(module, x, opset, input_name, output_name)
    else:
        model, caught = _export_dynamo(module, x, opset, input_name, output_name)
    for note in caught:
        log.debug("exporter: %s", note)
    _finish(model, opset, input_name, output_name, metadata or {})
    check_model(model, what=f"exported segment ({output_name})")
    with torch.no_grad():
        out_shape = list(module(x).shape[1:])
    return ExportedSegment(model, input_name, output_name, out_shape, caught)


def _export_dynamo(module: nn.Module, x: torch.Tensor, opset: int, input_name: str,
                   output_name: str) -> tuple[onnx.ModelProto, list[str]]:
    batch = torch.export.Dim(BATCH, min=1)
    caught: list[str] = []
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    # the exporter logs registry notes (e.g. "torchvision is not installed") and emits
    # FutureWarnings from torch internals; keep them for --verbose instead of the terminal
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as records, torch.no_grad():
            warnings.simplefilter("always")
            program = torch.onnx.export(
                module, (x,), dynamo=True, opset_version=opset, input_names=[input_name],
                output_names=[output_name], dynamic_shapes=({0: batch},), external_data=False,
                optimize=True, verbose=False,
            )
            caught = _unique(f"{r.category.__name__}: {r.message}" for r in records)
    except Exception as exc:   # torch.export raises many types; report them as one error
        raise ExportError(f"torch.onnx.export (dynamo) failed for the segment "
                          f"({', '.join(n for n, _ in module.named_children())}): "
                          f"{_cause(exc)}") from exc
    finally:
        exporter_log.setLevel(level)
    if program is None:   # only the legacy exporter returns None
        raise ExportError("torch.onnx.export returned no program")
    return program.model_proto, caught


def _export_torchscript(module: nn.Module, x: torch.Tensor, opset: int, input_name: str,
                        output_name: str) -> tuple[onnx.ModelProto, list[str]]:
    """The TorchScript-based exporter: the one that writes opsets below 18 directly."""
    buffer = io.BytesIO()
    axes = {input_name: {0: BATCH}, output_name: {0: BATCH}}
    try:
        with warnings.catch_warnings(record=True) as records, torch.no_grad():
            warnings.simplefilter("always")
            # the TorchScript exporter writes to file objects; torch annotates `f` as a path only
            torch.onnx.export(module, (x,), buffer,  # type: ignore[arg-type]
                              dynamo=False, opset_version=opset,
                              input_names=[input_name], output_names=[output_name],
                              dynamic_axes=axes, do_constant_folding=True)
            caught = _unique(f"{r.category.__name__}: {r.message}" for r in records)
    except Exception as exc:   # jit tracing and symbolic functions raise many types
        raise ExportError(f"torch.onnx.export (TorchScript, opset {opset}) failed for the "
                          f"segment: {_cause(exc)}") from exc
    model = onnx.load_from_string(buffer.getvalue())
    # the exporter stamps the IR version of the onnx it was built with; old runtimes refuse
    # anything newer than they know, and the opset needs no more than this
    model.ir_version = min(model.ir_version, ir_version_for(opset))
    return model, caught


def _finish(model: onnx.ModelProto, opset: int, input_name: str, output_name: str,
            metadata: dict[str, str]) -> None:
    """Check and normalise what the exporter produced, in place."""
    main = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if main != [opset]:
        raise ExportError(f"the exporter wrote ai.onnx opset {main}, {opset} was asked for")
    if len(model.functions):
        # local functions are a torch-lib detail a small runtime may not support: inline them
        from onnx import inliner

        inlined = inliner.inline_local_functions(model)
        model.CopyFrom(inlined)
    graph = model.graph
    if [i.name for i in graph.input] != [input_name] or [o.name for o in graph.output] != [
            output_name]:
        raise ExportError(f"exported graph has inputs {[i.name for i in graph.input]} and "
                          f"outputs {[o.name for o in graph.output]}; expected "
                          f"[{input_name!r}] and [{output_name!r}]")
    for tensor in graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ExportError(f"initializer {tensor.name!r} is stored as external data; "
                              "a bundle must be one self-contained file")
    for value in (graph.input[0], graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        if not dims:
            raise ExportError(f"{value.name!r} has no shape in the exported graph")
        # one symbolic name for the batch axis on both ends: what the manifest calls it
        dims[0].ClearField("dim_value")
        dims[0].dim_param = BATCH
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def check_model(model: onnx.ModelProto | str | Path, *, what: str = "model") -> None:
    """``onnx.checker.check_model(full_check=True)`` (with shape inference) as an ExportError."""
    try:
        onnx.checker.check_model(model if isinstance(model, onnx.ModelProto) else str(model),
                                 full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{what} fails onnx.checker (full check): {_first_line(exc)}") from None


def save_model(model: onnx.ModelProto, path: Path) -> int:
    """Write ``model`` as one file with every tensor inline; return its size in bytes."""
    onnx.save_model(model, str(path), save_as_external_data=False)
    return path.stat().st_size


def model_opset(model: onnx.ModelProto) -> int:
    """The model's ai.onnx opset."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ExportError("model imports no ai.onnx opset")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _cause(exc: BaseException) -> str:
    """The root error: torch wraps it in a long multi-step banner with terminal colours."""
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    return f"{type(root).__name__}: {_ANSI.sub('', _first_line(root))}"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _unique(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item[:300], None)
    return list(seen)
