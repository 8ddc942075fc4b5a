"""Cut a chain-shaped model at named layers.

A model qualifies when it is an ``nn.Sequential`` or any module whose forward applies its named
children in order; :func:`check_chain` verifies the latter on a probe input. Segments share
parameters with the model they came from, so training a segment trains the model.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from edgesplit.errors import ConfigError

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


def cut_model(model: nn.Module, cut: str) -> tuple[nn.Sequential, nn.Sequential]:
    """Split after layer ``cut`` into (client segment, server segment)."""
    i = _index(model, cut)
    return _segment(model, 0, i + 1), _segment(model, i + 1, len(layer_names(model)))


def cut_ushape(
    model: nn.Module, first: str, second: str
) -> tuple[nn.Sequential, nn.Sequential, nn.Sequential]:
    """Split after ``first`` and ``second``: (client bottom, server middle, client head)."""
    i, j = _index(model, first, what="first cut"), _index(model, second, what="second cut")
    if j <= i:
        raise ConfigError(
            f"ushape cuts must be in forward order: {second!r} comes before or at {first!r}; "
            f"order: {', '.join(layer_names(model))}"
        )
    n = len(layer_names(model))
    return _segment(model, 0, i + 1), _segment(model, i + 1, j + 1), _segment(model, j + 1, n)


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
    """Cuts after a non-linearity or pooling layer that leave both segments non-empty and give
    the client at least one layer with parameters (a non-trivial client segment)."""
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
    """Raise :class:`ConfigError` unless running the children in order equals ``model(example)``."""
    with torch.no_grad():
        expected = model(example)
        got = _segment(model, 0, len(layer_names(model)))(example)
    if expected.shape != got.shape or not torch.allclose(expected, got, atol=1e-6):
        raise ConfigError(
            f"{type(model).__name__}.forward is not the chain of its children "
            f"({', '.join(layer_names(model))}); wrap it as nn.Sequential to cut it"
        )
