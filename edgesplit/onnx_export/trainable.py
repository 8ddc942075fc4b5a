"""A *trainable* bundle: the client segment's forward and backward as ONNX graphs, so a device
with onnxruntime and numpy (no torch) trains its own layers from the gradients the server sends.

How (issue 13's prototype): AOTAutograd captures the segment as two FX graphs with the
parameters as graph **inputs** and core ATen decompositions applied; each graph is exported with
the torch.export-based ONNX exporter and a dynamic batch axis. The forward returns the cut tensor
and the residuals the backward needs; the backward takes the residuals and the cut gradient and
returns one gradient per parameter. A gradient parity check against torch autograd at several
batch sizes is mandatory: some layers export *silently wrong* (BatchNorm in training mode becomes
a BatchNormalization node on running statistics), so nothing is written unless it holds.

Files added to an ordinary bundle (``edgesplit.edge.bundle`` still loads it for inference)::

    train_forward.onnx    (params..., x) -> (cut, residuals...)
    train_backward.onnx   (residuals..., grad_cut) -> (grad per parameter...)
    train_infer.onnx      x -> cut, parameters as raw initializers at recorded byte offsets: the
                          device writes trained values over them to make an ordinary client.onnx
    params.npz            the initial parameters (numpy, no pickle)

``manifest.json`` gets a ``trainable`` section (:data:`TRAINABLE_KEYS`). The private torch APIs
used here are pinned by the torch version in constraints.txt and covered by tests.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from edgesplit.edge.bundle import BATCH, MANIFEST_FILE, sha256_bytes, validate_manifest
from edgesplit.errors import ExportError
from edgesplit.onnx_export.parity import ort_session
from edgesplit.onnx_export.pipeline import ExportOptions, export_bundle
from edgesplit.onnx_export.segment import DEFAULT_OPSET, check_model
from edgesplit.onnx_export.source import SplitModel
from edgesplit.split.preprocess import stats_json, without_standardize

log = logging.getLogger(__name__)

FORWARD_FILE = "train_forward.onnx"
BACKWARD_FILE = "train_backward.onnx"
INFER_FILE = "train_infer.onnx"
PARAMS_FILE = "params.npz"
TRAINABLE_SCHEMA = 1
#: Layers whose training graphs export correctly and pass parity today. Anything else is refused
#: by name (BatchNorm: wrong in training mode and with a dynamic batch; Dropout: needs its mask
#: as a residual; adaptive/average pooling: their backward has no decomposition yet). Conv's
#: ``convolution_backward`` has no ONNX translation: :func:`_convolution_backward` rebuilds it.
TRAINABLE_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.MaxPool1d, nn.MaxPool2d, nn.ReLU, nn.LeakyReLU, nn.Tanh,
    nn.Sigmoid, nn.GELU, nn.ELU, nn.SiLU, nn.Flatten, nn.Unflatten, nn.Identity,
)
#: Parity batch sizes: 1 and odd sizes catch a batch axis baked in as a constant.
PARITY_BATCH_SIZES = (1, 7, 32)
#: Two capture batch sizes: the axes whose size differs between them are the batch axes.
_CAPTURE_BATCHES = (11, 13)
GRAD_ATOL = 1e-5
GRAD_RTOL = 1e-4


def check_trainable_layers(lower: nn.Module, allowed: Sequence[type[nn.Module]] = TRAINABLE_LAYERS
                           ) -> None:
    """Raise :class:`ExportError` naming every layer of ``lower`` the device cannot train."""
    bad = [f"{name} ({type(m).__name__})" for name, m in lower.named_modules()
           if not list(m.children()) and not isinstance(m, tuple(allowed))]
    if bad:
        raise ExportError(
            f"cannot export a trainable client: layer(s) {', '.join(bad)} cannot be trained on "
            f"the device; trainable layers: {', '.join(t.__name__ for t in TRAINABLE_LAYERS)}")
    buffers = [n for n, _ in lower.named_buffers()]
    if buffers:
        raise ExportError(f"cannot export a trainable client: buffers {', '.join(buffers)} "
                          "would have to be updated on the device (not supported)")


# ---------------------------------------------------------------------------------- capture
def _convolution_backward(grad_out: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor,
                          bias_sizes: Any, stride: list[int], padding: list[int],
                          dilation: list[int], transposed: bool, output_padding: list[int],
                          groups: int, output_mask: list[bool]) -> Any:
    """``convolution_backward`` from two forward convolutions (it has no ONNX translation):
    the input gradient is a transposed convolution of the output gradient, the weight gradient
    a convolution of the input by the output gradient with stride and dilation swapped."""
    if transposed or groups != 1:
        return NotImplemented
    aten = torch.ops.aten
    nd = len(stride)
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        pad_out = [int(inp.shape[2 + i]) - ((int(grad_out.shape[2 + i]) - 1) * stride[i]
                                            - 2 * padding[i]
                                            + dilation[i] * (int(weight.shape[2 + i]) - 1) + 1)
                   for i in range(nd)]
        grad_input = aten.convolution.default(grad_out, weight, None, stride, padding, dilation,
                                              True, pad_out, 1)
    if output_mask[1]:
        full = aten.convolution.default(inp.transpose(0, 1), grad_out.transpose(0, 1), None,
                                        dilation, padding, stride, False, [0] * nd, 1)
        grad_weight = full.transpose(0, 1)
        for i in range(nd):
            grad_weight = grad_weight.narrow(2 + i, 0, int(weight.shape[2 + i]))
    if output_mask[2]:
        grad_bias = grad_out.sum([0, *range(2, 2 + nd)])
    return grad_input, grad_weight, grad_bias


def default_decompositions() -> dict[Any, Any]:
    """Core ATen decompositions, plus the backward ops ONNX has no translation for."""
    from torch._decomp import core_aten_decompositions, decomposition_table

    aten = torch.ops.aten
    table = dict(core_aten_decompositions())
    table[aten.convolution_backward.default] = _convolution_backward
    for op in (aten.max_pool2d_with_indices_backward.default,):
        table[op] = decomposition_table[op]
    return table


def _symbolize_batch(gm: torch.fx.GraphModule, twin: torch.fx.GraphModule, batch: int,
                     twin_batch: int, what: str) -> None:
    """Replace integer constants that follow the capture batch size (``view(x, [11, 1, 8, 8])``)
    by sizes read from the graph's last input, whose axis 0 is the batch; in place.

    ``twin`` is the same graph captured at another batch size: a constant that differs between
    them by the batch ratio is ``batch · k``.
    """
    import operator

    nodes, others = list(gm.graph.nodes), list(twin.graph.nodes)
    if len(nodes) != len(others) or any(a.target != b.target for a, b in zip(nodes, others,
                                                                             strict=True)):
        raise ExportError(f"the {what} graph changes with the batch size; cannot make the "
                          "batch axis dynamic")
    source = [n for n in nodes if n.op == "placeholder"][-1]
    graph = gm.graph

    def fix(a: Any, b: Any, node: torch.fx.Node) -> Any:
        if isinstance(a, list | tuple):
            return type(a)(fix(u, v, node) for u, v in zip(a, b, strict=True))
        if isinstance(a, int) and not isinstance(a, bool) and isinstance(b, int) and a != b:
            if a % batch or a // batch * twin_batch != b:
                raise ExportError(f"the {what} graph holds a size {a} that depends on the batch "
                                  f"but is not a multiple of it (node {node.name})")
            with graph.inserting_before(node):
                size = graph.call_function(torch.ops.aten.sym_size.int, (source, 0))
                return size if a == batch else graph.call_function(operator.mul,
                                                                   (size, a // batch))
        return a

    for node, other in zip(nodes, others, strict=True):
        if node.op != "call_function":
            continue
        node.args = fix(node.args, other.args, node)
        node.kwargs = {k: fix(v, other.kwargs.get(k), node) for k, v in node.kwargs.items()}
    graph.lint()
    gm.recompile()


def _capture(lower: nn.Module, names: list[str], batch: int, sample_shape: tuple[int, ...],
             decompositions: dict[Any, Any] | None, input_grad: bool = False
             ) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule, list[Any]]:
    """AOTAutograd forward/backward graphs of ``lower`` at one batch size, and the fw outputs."""
    from torch._functorch.aot_autograd import aot_function, make_boxed_func
    from torch.func import functional_call

    graphs: dict[str, torch.fx.GraphModule] = {}

    def keep(role: str) -> Any:
        def compiler(gm: torch.fx.GraphModule, _example: Any) -> Any:
            graphs[role] = gm
            return make_boxed_func(gm.forward)
        return compiler

    def fn(*args: torch.Tensor) -> torch.Tensor:
        return functional_call(lower, dict(zip(names, args[:-1], strict=True)), (args[-1],))

    compiled = aot_function(fn, fw_compiler=keep("fw"), bw_compiler=keep("bw"),
                            decompositions=decompositions or {})
    params = [p.detach().clone().requires_grad_(True) for p in lower.parameters()]
    x = torch.randn(batch, *sample_shape).requires_grad_(input_grad)
    out = compiled(*params, x)
    out.backward(torch.randn_like(out))
    fw_outputs = graphs["fw"](*[p.detach() for p in params], x.detach())
    return graphs["fw"], graphs["bw"], list(fw_outputs)


def _drop_none_outputs(gm: torch.fx.GraphModule) -> list[bool]:
    """Remove ``None`` outputs of ``gm`` in place; returns which outputs were kept."""
    node = next(n for n in gm.graph.nodes if n.op == "output")
    values = node.args[0]
    kept = [v is not None for v in values]
    node.args = (tuple(v for v in values if v is not None),)
    gm.recompile()
    return kept


def _export_graph(module: nn.Module, args: tuple[torch.Tensor, ...], input_names: list[str],
                  output_names: list[str], batch_inputs: list[bool], what: str,
                  opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """One graph ▸ ONNX with a dynamic batch axis on the inputs flagged in ``batch_inputs``."""
    batch = torch.export.Dim(BATCH, min=1)
    shapes = tuple({0: batch} if b else None for b in batch_inputs)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=opset, input_names=input_names,
                output_names=output_names, dynamic_shapes=shapes, external_data=False,
                optimize=True, verbose=False)
    except Exception as exc:   # torch.export raises many types; one line for the user
        root: BaseException = exc
        while root.__cause__ is not None:
            root = root.__cause__
        first = (str(root).strip().splitlines() or [type(root).__name__])[0]
        raise ExportError(f"cannot export the {what} graph: {type(root).__name__}: "
                          f"{first[:300]}") from exc
    finally:
        exporter_log.setLevel(level)
    if program is None:
        raise ExportError(f"torch.onnx.export returned no program for the {what} graph")
    model = program.model_proto
    if len(model.functions):
        from onnx import inliner

        model.CopyFrom(inliner.inline_local_functions(model))
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != input_names or got_out != output_names:
        raise ExportError(f"the {what} graph has inputs {got_in} and outputs {got_out}; "
                          f"expected {input_names} and {output_names}")
    for value, flagged in zip(model.graph.input, batch_inputs, strict=True):
        if flagged:
            value.type.tensor_type.shape.dim[0].dim_param = BATCH
    check_model(model, what=f"{what} graph")
    return model


def _infer_template(fw: torch.fx.GraphModule, names: list[str], params: list[np.ndarray],
                    example: torch.Tensor, opset: int, names_io: tuple[str, str] = ("x", "cut")
                    ) -> tuple[bytes, list[dict[str, int]]]:
    """The inference graph with the parameters as raw initializers, and where their bytes are.

    The device overwrites those byte ranges with trained values of the same size (protobuf
    length-delimited fields keep their length), which gives an ordinary ``client.onnx`` without
    onnx or torch on the device.
    """
    # the forward graph without its residuals: the same ops the device trains with
    module = copy.deepcopy(fw)
    node = next(n for n in module.graph.nodes if n.op == "output")
    node.args = (node.args[0][0],)
    module.graph.eliminate_dead_code()
    module.recompile()
    inputs = [f"param_{i}" for i in range(len(names))] + [names_io[0]]
    model = _export_graph(module, (*[torch.from_numpy(p) for p in params], example), inputs,
                          [names_io[1]], [False] * len(names) + [True], "inference", opset)
    graph = model.graph
    keep = [i for i in graph.input if i.name == names_io[0]]
    by_name = {f"param_{i}": p for i, p in enumerate(params)}
    for inp in [i for i in graph.input if i.name != names_io[0]]:
        graph.initializer.append(onnx.numpy_helper.from_array(
            np.ascontiguousarray(by_name[inp.name], dtype="<f4"), inp.name))
    del graph.input[:]
    graph.input.extend(keep)
    check_model(model, what="inference graph")
    data = model.SerializeToString()
    spans = []
    for i, p in enumerate(params):
        raw = np.ascontiguousarray(p, dtype="<f4").tobytes()
        offset = data.find(raw)
        # the span must be unambiguous: the device writes blindly at this offset
        if offset < 0 or data.find(raw, offset + 1) >= 0:
            raise ExportError(f"cannot locate parameter {names[i]!r} uniquely in the inference "
                              "graph (constant or repeated values); it cannot be written back")
        spans.append({"offset": offset, "nbytes": len(raw)})
    return data, spans


# ---------------------------------------------------------------------------------- parity
def _parity(lower: nn.Module, names: list[str], fw: bytes, bw: bytes, infer: bytes,
            samples: np.ndarray, batch_sizes: Sequence[int], residuals: list[str],
            input_grad: bool = False, names_io: tuple[str, str] = ("x", "cut")) -> dict[str, Any]:
    """ORT forward+backward against torch autograd; returns a record (``passed`` inside)."""
    fw_s, bw_s, inf_s = ort_session(fw), ort_session(bw), ort_session(infer)
    rng = np.random.default_rng(0)
    params = {n: p.detach().numpy().copy() for n, p in lower.named_parameters()}
    worst_abs = worst_rel = 0.0
    worst = ""
    passed = True
    for size in batch_sizes:
        x = samples[rng.integers(0, len(samples), size)]
        module = copy.deepcopy(lower).train()
        xt = torch.from_numpy(x).requires_grad_(input_grad)
        cut_t = module(xt)
        g = rng.standard_normal(cut_t.shape).astype(np.float32)
        cut_t.backward(torch.from_numpy(g))
        ref = {"cut": cut_t.detach().numpy()}
        ref.update({f"grad {n}": p.grad.numpy() for n, p in module.named_parameters()
                    if p.grad is not None})
        if input_grad and xt.grad is not None:
            ref["grad input"] = xt.grad.numpy()
        feeds = {f"param_{i}": params[n] for i, n in enumerate(names)}
        out = fw_s.run(None, {**feeds, names_io[0]: x})
        got = {"cut": out[0]}
        back = bw_s.run(None, {**dict(zip(residuals, out[1:], strict=True)), "grad_cut": g})
        got.update({f"grad {n}": v for n, v in zip(names, back[:len(names)], strict=True)})
        if input_grad:
            got["grad input"] = back[len(names)]
        got["inference cut"] = inf_s.run(None, {names_io[0]: x})[0]
        ref["inference cut"] = ref["cut"]
        for key, want in ref.items():
            have = got.get(key)
            if have is None or have.shape != want.shape or not np.isfinite(have).all():
                passed, worst = False, f"{key} missing, misshaped or not finite at batch {size}"
                worst_abs = worst_rel = float("inf")
                continue
            diff = np.abs(have.astype(np.float64) - want)
            rel = float((diff / np.maximum(np.abs(want), GRAD_ATOL)).max(initial=0.0))
            if not np.all(diff <= GRAD_ATOL + GRAD_RTOL * np.abs(want)):
                passed = False
            if float(diff.max(initial=0.0)) > worst_abs:
                worst_abs, worst = float(diff.max(initial=0.0)), f"{key} at batch {size}"
            worst_rel = max(worst_rel, rel)
    return {"batch_sizes": list(batch_sizes), "max_abs": worst_abs, "max_rel": worst_rel,
            "atol": GRAD_ATOL, "rtol": GRAD_RTOL, "worst": worst, "passed": passed,
            "reference": "torch autograd (train mode)"}


# ---------------------------------------------------------------------------------- public
def build_trainable(lower: nn.Module, samples: np.ndarray, *,
                    decompositions: dict[Any, Any] | None = None,
                    check_layers: bool = True, opset: int = DEFAULT_OPSET,
                    batch_sizes: Sequence[int] = PARITY_BATCH_SIZES, input_grad: bool = False,
                    prefix: str = "", names_io: tuple[str, str] = ("x", "cut")
                    ) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The trainable files of one client segment and its ``trainable`` manifest section.

    Parameters
    ----------
    lower:
        The client segment (copied; the caller's module is not changed).
    samples:
        float32 inputs ``(n, *sample shape)`` for the parity check.
    decompositions:
        ATen decompositions applied while capturing; default torch's core ATen set (without
        them BatchNorm in training mode exports wrong: the parity check then refuses it).
    check_layers:
        Refuse layers outside :data:`TRAINABLE_LAYERS` before trying.
    opset, batch_sizes:
        ai.onnx opset; batch sizes of the gradient parity check.
    input_grad:
        The backward graph also returns the gradient of the input (``grad_input``, last): a
        ushape head passes it on to the server.
    prefix, names_io:
        File name prefix (``head_``) and the input/output names of the inference graph.

    Raises
    ------
    ExportError
        An untrainable layer (named), a graph the exporter cannot translate, or a parity failure.
    """
    lower = copy.deepcopy(lower).train()
    if check_layers:
        check_trainable_layers(lower)
    names = [n for n, _ in lower.named_parameters()]
    if not names:
        raise ExportError("the client segment has no parameters: nothing to train on the device")
    sample_shape = tuple(samples.shape[1:])
    decomp = default_decompositions() if decompositions is None else decompositions
    try:
        captures = [_capture(lower, names, b, sample_shape, decomp, input_grad)
                    for b in _CAPTURE_BATCHES]
    except Exception as exc:   # AOTAutograd raises torch internals' types; one line for the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"cannot capture the segment's forward/backward graphs: "
                          f"{type(exc).__name__}: {first[:300]}") from exc
    (fw, bw, outs), (fw2, bw2, outs2) = captures
    _symbolize_batch(fw, fw2, _CAPTURE_BATCHES[0], _CAPTURE_BATCHES[1], "forward")
    _symbolize_batch(bw, bw2, _CAPTURE_BATCHES[0], _CAPTURE_BATCHES[1], "backward")
    if len(outs) != len(outs2):
        raise ExportError("the segment's saved tensors depend on the batch size; cannot train it")
    # residual batch axes: dims that change with the batch; only axis 0 may
    res_batch = []
    for k, (a, b) in enumerate(zip(outs[1:], outs2[1:], strict=True)):
        differ = [d for d, (u, v) in enumerate(zip(a.shape, b.shape, strict=True)) if u != v]
        if differ not in ([], [0]):
            raise ExportError(f"residual {k} has batch-dependent axes {differ}; only axis 0 may "
                              "depend on the batch")
        res_batch.append(differ == [0])
    kept = _drop_none_outputs(bw)
    _drop_none_outputs(bw2)
    if kept[:len(names)] != [True] * len(names):
        missing = [n for n, k in zip(names, kept, strict=False) if not k]
        raise ExportError(f"parameter(s) {', '.join(missing)} get no gradient: remove or freeze "
                          "them before exporting a trainable client")
    if input_grad and (len(kept) <= len(names) or not kept[len(names)]):
        raise ExportError("the segment's input gets no gradient; cannot pass one on")
    residuals = [f"res_{k}" for k in range(len(outs) - 1)]
    grads = [f"grad_{i}" for i in range(len(names))]
    bw_outputs = [*grads, "grad_input"] if input_grad else grads
    params = [p.detach().numpy().copy() for p in lower.parameters()]
    batch = _CAPTURE_BATCHES[0]
    x = torch.from_numpy(np.ascontiguousarray(samples[:1], dtype=np.float32)).expand(
        batch, *sample_shape).contiguous() + 0.0
    fw_args = (*[torch.from_numpy(p) for p in params], x)
    fw_outs = fw(*fw_args)
    g = torch.ones_like(fw_outs[0])
    fw_model = _export_graph(fw, fw_args, [f"param_{i}" for i in range(len(names))] + [names_io[0]],
                             ["cut", *residuals], [False] * len(names) + [True], "forward", opset)
    bw_model = _export_graph(bw, (*[t.detach() for t in fw_outs[1:]], g), [*residuals, "grad_cut"],
                             bw_outputs, [*res_batch, True], "backward", opset)
    infer, spans = _infer_template(fw, names, params, x, opset, names_io)
    fw_bytes, bw_bytes = fw_model.SerializeToString(), bw_model.SerializeToString()
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    parity = _parity(lower, names, fw_bytes, bw_bytes, infer, samples, batch_sizes, residuals,
                     input_grad, names_io)
    if not parity["passed"]:
        raise ExportError(
            f"gradient parity FAILED: ONNX forward/backward and torch autograd differ by up to "
            f"{parity['max_abs']:.3g} ({parity['worst']}; atol {GRAD_ATOL:g}, rtol "
            f"{GRAD_RTOL:g}); the trainable bundle is not written")
    buf = io.BytesIO()
    # arrays only, read back with allow_pickle=False on the device
    np.savez(buf, **{f"param_{i}": p for i, p in enumerate(params)})
    names_of = {role: prefix + name for role, name in (
        ("forward", FORWARD_FILE), ("backward", BACKWARD_FILE), ("infer", INFER_FILE),
        ("params", PARAMS_FILE))}
    files = {names_of["forward"]: fw_bytes, names_of["backward"]: bw_bytes,
             names_of["infer"]: infer, names_of["params"]: buf.getvalue()}
    section = {
        "schema": TRAINABLE_SCHEMA,
        "files": names_of,
        "params": [{"name": n, "input": f"param_{i}", "grad": grads[i], "key": f"param_{i}",
                    "shape": list(p.shape), "dtype": "float32", **spans[i]}
                   for i, (n, p) in enumerate(zip(names, params, strict=True))],
        "buffers": [],
        "residuals": [{"name": r, "batch_axis": 0 if b else None,
                       "shape": [BATCH, *map(int, o.shape[1:])] if b else list(o.shape)}
                      for r, b, o in zip(residuals, res_batch, outs[1:], strict=True)],
        "forward": {"inputs": [f"param_{i}" for i in range(len(names))] + [names_io[0]],
                    "outputs": ["cut", *residuals]},
        "backward": {"inputs": [*residuals, "grad_cut"], "outputs": bw_outputs},
        "infer": {"input": names_io[0], "output": names_io[1]},
        "batch": {"policy": "dynamic", "min": 1, "parity_batch_sizes": list(batch_sizes)},
        "parity": parity,
        "layers": [f"{n} ({type(m).__name__})" for n, m in lower.named_modules()
                   if not list(m.children())],
        "capture": f"AOTAutograd + core ATen decompositions, torch {torch.__version__}",
    }
    return files, section


def export_trainable(model: SplitModel, out: Path, *, party: int = 0) -> dict[str, Any]:
    """Write a trainable bundle of ``model``'s client segment ``party`` into ``out``.

    It is an ordinary bundle (``client.onnx``, manifest, the server folder ``out.server``
    beside it) plus the training graphs, the initial parameters and a ``trainable`` manifest
    section (parameter order and shapes, residual names, batch policy, gradient parity).

    Parameters
    ----------
    model:
        The split model (:meth:`SplitModel.from_checkpoint`).
    out:
        The bundle directory (replaced if it holds an earlier export).
    party:
        Which client segment (vertical party K; else 0).

    Returns
    -------
    dict
        The manifest written.

    Raises
    ------
    ExportError
        An untrainable layer (named), a graph the exporter cannot translate, or a gradient
        parity failure (of the segment, or of a ushape head). Nothing is written then.
    """
    model.check_party(party)
    lower = model.lowers[party]
    samples, _source = model.samples(party, 256)
    # the input standardization stays outside the training graphs: the device applies it in
    # numpy (its statistics are fixed, never trained)
    core, standardize = without_standardize(lower)
    with torch.no_grad():
        core_samples = samples if standardize is None else standardize(
            torch.from_numpy(samples)).numpy()
    files, section = build_trainable(core, core_samples)   # before anything is written
    section["preprocess"] = stats_json(standardize)
    if model.head is not None:
        # ushape: the head trains on the device too, and passes the gradient of its input
        # (the server's middle output) back to the server
        with torch.no_grad():
            mids = model.server.eval()(lower.eval()(torch.from_numpy(samples))).numpy()
        head_files, head_section = build_trainable(model.head, mids, input_grad=True,
                                                   prefix="head_", names_io=("mid", "logits"))
        files.update(head_files)
        section["head"] = head_section
    out = Path(out)
    report = export_bundle(model, out, ExportOptions(party=party))
    manifest = dict(report.manifest)
    lr = (model.meta.get("spec") or {}).get("lr")
    section["optimizer"] = {"name": "sgd", "lr": float(lr) if lr else 0.02, "momentum": 0.9}
    for name, data in files.items():
        (out / name).write_bytes(data)
        manifest["sha256"][name] = sha256_bytes(data)
    manifest["trainable"] = section
    validate_manifest(manifest, f"{out}/{MANIFEST_FILE} (about to be written)")
    tmp = out / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(out / MANIFEST_FILE)
    return manifest
