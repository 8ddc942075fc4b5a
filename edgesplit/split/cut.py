"""Cut a model at named layers.

An ``nn.Sequential`` is cut after one of its children (segments are ``nn.Sequential`` too). Any
other model is traced with torch.fx and cut after a named module (:mod:`edgesplit.split.graph`):
a custom ``forward``, residual blocks, reshapes of the input, nested names such as
``features.6``. Segments share parameters with the model they came from, so training a segment
trains the model.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from edgesplit.errors import ConfigError
from edgesplit.split.graph import as_module as _as_module
from edgesplit.split.graph import (
    candidate_modules,
    graph_cuts,
    module_calls,
    remember_input_shape,
    split_graph,
    trace,
)

# layers after which a cut makes sense: the client sends features, not pre-activations
_CUTTABLE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.GELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.SiLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
)


def layer_names(model: nn.Module) -> list[str]:
    """Names of the model's children, in forward order."""
    return [name for name, _ in model.named_children()]


def _index(model: nn.Module, cut: str, *, what: str = "cut") -> int:
    names = layer_names(model)
    if cut not in names[:-1]:
        valid = ", ".join(names[:-1]) or "(model has fewer than two layers)"
        last = (
            f" ({cut!r} is the last layer: nothing would be left for the server)"
            if names and cut == names[-1]
            else ""
        )
        raise ConfigError(f"unknown {what} {cut!r}{last}; valid cuts (cut after): {valid}")
    return names.index(cut)


def _segment(model: nn.Module, start: int, stop: int) -> nn.Sequential:
    children = list(model.named_children())[start:stop]
    return nn.Sequential(OrderedDict(children))


def _sequential_cut(model: nn.Module, *cuts: str) -> bool:
    """Cut by children (today's path): a Sequential, cut at its children's names."""
    return isinstance(model, nn.Sequential) and all(c in layer_names(model) for c in cuts)


def _check_named(model: nn.Module, cut: str, what: str) -> None:
    if isinstance(model, nn.Sequential) and "." not in cut:
        _index(model, cut, what=what)   # the Sequential message: valid children
    if cut not in dict(model.named_modules()) or not cut:
        raise ConfigError(f"unknown {what} {cut!r}: {type(model).__name__} has no module of that "
                          f"name; candidates: {', '.join(candidate_modules(model))} (see "
                          "`edgesplit cuts`)")


def cut_model(model: nn.Module, cut: str, *, input_shape: tuple[int, ...] | None = None
              ) -> tuple[nn.Module, nn.Module]:
    """Split after layer ``cut`` into (client segment, server segment).

    Parameters
    ----------
    model:
        An ``nn.Sequential`` (cut after the child ``cut``), or any module whose forward
        torch.fx can trace (cut after the module named ``cut``, e.g. ``block1``, ``layer2``,
        ``features.6``).
    cut:
        The module's name, as in ``model.named_modules()``.
    input_shape:
        Per-sample input shape, for forwards that branch on shapes; defaults to the shape the
        model was built for (:func:`edgesplit.models.build_model` records it).

    Returns
    -------
    (client, server)
        ``server(client(x))`` equals ``model(x)``. ``nn.Sequential`` segments when cut by
        children or when the traced segment is a chain of top-level modules, else
        ``torch.fx.GraphModule``.

    Raises
    ------
    ConfigError
        Unknown name, the last layer, an untraceable forward, or a skip connection over the
        cut (more than one tensor would cross it).
    """
    if _sequential_cut(model, cut):
        i = _index(model, cut)
        return _segment(model, 0, i + 1), _segment(model, i + 1, len(layer_names(model)))
    _check_named(model, cut, "cut")
    client, server = split_graph(trace(model, [cut], input_shape), cut)
    return _as_module(client), _as_module(server)


def cut_ushape(
    model: nn.Module, first: str, second: str, *, input_shape: tuple[int, ...] | None = None
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """Split after ``first`` and ``second``: (client bottom, server middle, client head).
    Non-Sequential models are traced as in :func:`cut_model`."""
    if not _sequential_cut(model, first, second):
        return _graph_ushape(model, first, second, input_shape)
    i, j = _index(model, first, what="first cut"), _index(model, second, what="second cut")
    if j <= i:
        raise ConfigError(
            f"ushape cuts must be in forward order: {second!r} comes before or at {first!r}; "
            f"order: {', '.join(layer_names(model))}"
        )
    n = len(layer_names(model))
    return _segment(model, 0, i + 1), _segment(model, i + 1, j + 1), _segment(model, j + 1, n)


def _graph_ushape(model: nn.Module, first: str, second: str,
                  input_shape: tuple[int, ...] | None) -> tuple[nn.Module, nn.Module, nn.Module]:
    _check_named(model, first, "first cut")
    _check_named(model, second, "second cut")
    gm = trace(model, [first, second], input_shape)
    order = [str(n.target) for n in module_calls(gm.graph)]
    if first in order and second in order and order.index(second) <= order.index(first):
        raise ConfigError(
            f"ushape cuts must be in forward order: {second!r} comes before or at {first!r}")
    bottom, rest = split_graph(gm, first)
    middle, head = split_graph(rest, second)
    return _as_module(bottom), _as_module(middle), _as_module(head)


def parse_cuts(
    cut: str | None, config: str, defaults: tuple[str, str] | str | None
) -> tuple[str, ...]:
    """The cut option as a tuple: one name, or two for ushape (``"a,b"``)."""
    if cut is None:
        if defaults is None:
            raise ConfigError("this model has no default cut; pass --cut LAYER")
        return (defaults,) if isinstance(defaults, str) else tuple(defaults)
    parts = tuple(p.strip() for p in cut.split(",") if p.strip())
    want = 2 if config == "ushape" else 1
    if len(parts) != want:
        raise ConfigError(
            f"config {config!r} takes {want} cut name{'s' if want > 1 else ''} "
            f"({'first,second' if want > 1 else 'LAYER'}), got {cut!r}"
        )
    return parts


def valid_cuts(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> list[str]:
    """Cuts that leave both segments non-empty and give the client at least one layer with
    parameters (a non-trivial client segment). ``nn.Sequential``: after a non-linearity or
    pooling layer. Other models: after a direct child (or a child of a direct container child)
    whose output is the only tensor crossing (:func:`edgesplit.split.graph.graph_cuts`)."""
    if not isinstance(model, nn.Sequential):
        return graph_cuts(model, input_shape)
    names = layer_names(model)
    children = dict(model.named_children())
    out: list[str] = []
    seen_params = False
    for name in names[:-1]:
        seen_params = seen_params or any(True for _ in children[name].parameters())
        if seen_params and isinstance(children[name], _CUTTABLE):
            out.append(name)
    return out


def check_chain(model: nn.Module, example: torch.Tensor) -> None:
    """Raise :class:`ConfigError` unless ``model`` can be cut: an ``nn.Sequential``, or a model
    whose torch.fx trace reproduces ``model(example)``. Records ``example``'s sample shape, so
    later cuts resolve shape-dependent control flow in forward (see :func:`cut_model`)."""
    remember_input_shape(model, example.shape[1:])
    if isinstance(model, nn.Sequential):
        return
    traced = trace(model, candidate_modules(model), tuple(example.shape[1:]))
    modes = {m: m.training for m in model.modules()}
    model.eval()   # compare without dropout noise or running-statistics updates
    try:
        with torch.no_grad():
            expected = model(example)
            got = traced(example)
    finally:
        for m, training in modes.items():
            m.training = training
    if (not isinstance(expected, torch.Tensor) or not isinstance(got, torch.Tensor)
            or expected.shape != got.shape or not torch.allclose(expected, got, atol=1e-5)):
        raise ConfigError(
            f"the torch.fx trace of {type(model).__name__}.forward does not reproduce it (a "
            "forward that returns several tensors, or reads self.training or globals, cannot "
            "be cut); return one tensor and use modules such as nn.Dropout")
