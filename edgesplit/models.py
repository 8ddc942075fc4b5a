"""Small built-in model families that adapt to the input shape, and loading the user's own.

Every built-in model is an ``nn.Sequential`` with named children, so a cut is simply a child's
name. A user model may have any traceable forward and is cut at a named module (see
:mod:`edgesplit.split.cut`). A user factory is
``build(input_shape: tuple[int, ...], num_classes: int) -> nn.Module`` in a file
(``my_models.py:build``) or an importable module (``package.module:build``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from torch import nn

from edgesplit.errors import ConfigError
from edgesplit.split.graph import remember_input_shape

FAMILIES = ("mlp", "cnn1d", "cnn2d")

#: The cut each family uses when none is given (after the first non-linearity or pooling:
#: the client keeps the raw input, only features leave).
DEFAULT_CUTS = {"mlp": "relu1", "cnn1d": "pool1", "cnn2d": "pool1"}
#: The cut a learned bottleneck (``--bottleneck``) uses when none is given: after the feature
#: extractor, where one code per channel describes the whole sample. A 1×1-convolution bottleneck
#: at an early conv cut keeps every spatial position (digits_images, 16:2, 30 epochs: ``pool1``
#: 20× and ``relu2`` 50× up, ``flatten`` 350× at equal accuracy).
DEFAULT_BOTTLENECK_CUTS = {"mlp": "relu1", "cnn1d": "flatten", "cnn2d": "flatten"}
#: ushape needs two cuts: client keeps the first segment and the head.
DEFAULT_USHAPE_CUTS = {
    "mlp": ("relu1", "relu2"),
    "cnn1d": ("pool1", "relu3"),
    "cnn2d": ("pool1", "relu3"),
}


def family_for_shape(input_shape: tuple[int, ...]) -> str:
    """``(F,)`` -> mlp, ``(C, L)`` -> cnn1d, ``(H, W)``/``(C, H, W)`` -> cnn2d."""
    if len(input_shape) == 1:
        return "mlp"
    if len(input_shape) == 2:
        # (C, L) with few channels is a signal; a square-ish (H, W) is an image
        c, length = input_shape
        return "cnn2d" if c > 16 and length > 16 else "cnn1d"
    if len(input_shape) == 3:
        return "cnn2d"
    raise ConfigError(
        f"no built-in model for samples of shape {input_shape}; pass --model file.py:build"
    )


def build_model(
    model: str, input_shape: tuple[int, ...], num_classes: int, *, hidden: int = 128
) -> nn.Module:
    """Build ``model`` (``auto``, a family name or a user factory) for this data."""
    if model == "auto":
        model = family_for_shape(input_shape)
    if model == "mlp":
        return mlp(input_shape, num_classes, hidden=hidden)
    if model == "cnn1d":
        return cnn1d(input_shape, num_classes)
    if model == "cnn2d":
        return cnn2d(input_shape, num_classes)
    if ":" in model:
        built = load_factory(model)(tuple(input_shape), num_classes)
        if not isinstance(built, nn.Module):
            raise ConfigError(f"model factory {model!r} returned {type(built).__name__}, not a "
                              "torch.nn.Module")
        # a later cut traces forward: shape-dependent branches resolve for this shape
        remember_input_shape(built, input_shape)
        return built
    raise ConfigError(
        f"unknown model {model!r}; use auto, {', '.join(FAMILIES)}, or file.py:build / "
        "package.module:build"
    )


def mlp(input_shape: tuple[int, ...], num_classes: int, *, hidden: int = 128) -> nn.Sequential:
    (features,) = input_shape
    return nn.Sequential(
        OrderedDict(
            [
                ("fc1", nn.Linear(features, hidden)),
                ("relu1", nn.ReLU()),
                ("fc2", nn.Linear(hidden, hidden // 2)),
                ("relu2", nn.ReLU()),
                ("fc3", nn.Linear(hidden // 2, num_classes)),
            ]
        )
    )


def cnn1d(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    channels, _ = input_shape
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv1d(channels, 16, 5, padding=2)),
                ("relu1", nn.ReLU()),
                ("pool1", nn.MaxPool1d(2, ceil_mode=True)),
                ("conv2", nn.Conv1d(16, 32, 5, padding=2)),
                ("relu2", nn.ReLU()),
                ("pool2", nn.AdaptiveAvgPool1d(8)),
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(32 * 8, 64)),
                ("relu3", nn.ReLU()),
                ("fc2", nn.Linear(64, num_classes)),
            ]
        )
    )


def cnn2d(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    channels = 1 if len(input_shape) == 2 else input_shape[0]
    layers: list[tuple[str, nn.Module]] = []
    if len(input_shape) == 2:
        layers.append(("unsqueeze", nn.Unflatten(1, (1, input_shape[0]))))  # (N,H,W)->(N,1,H,W)
    layers += [
        ("conv1", nn.Conv2d(channels, 16, 3, padding=1)),
        ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2, ceil_mode=True)),
        ("conv2", nn.Conv2d(16, 32, 3, padding=1)),
        ("relu2", nn.ReLU()),
        ("pool2", nn.AdaptiveAvgPool2d(4)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(32 * 16, 64)),
        ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(64, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))


def load_factory(ref: str) -> Callable[[tuple[int, ...], int], nn.Module]:
    """Resolve ``file.py:name`` or ``package.module:name`` to a callable."""
    target, _, attr = ref.rpartition(":")
    if not target or not attr:
        raise ConfigError(f"model factory {ref!r} must look like file.py:build or pkg.mod:build")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"model file {target!r} does not exist")
        spec = importlib.util.spec_from_file_location(f"edgesplit_user_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"cannot import {target!r} as a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # the user's code: report it, whatever it raised
            raise ConfigError(f"importing {target!r} failed: {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ConfigError(f"cannot import model module {target!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"{target!r} has no callable {attr!r}")
    return factory


def family_of(model: str, input_shape: tuple[int, ...]) -> str | None:
    """The built-in family ``model`` resolves to, or ``None`` for a user factory."""
    if model == "auto":
        return family_for_shape(input_shape)
    if model in FAMILIES:
        return model
    if ":" in model:
        target = model.rpartition(":")[0]
        if target.endswith(".py") and not Path(target).is_file():
            raise ConfigError(f"model file {target!r} does not exist")
        return None
    raise ConfigError(
        f"unknown model {model!r}; use auto, {', '.join(FAMILIES)}, or file.py:build / "
        "package.module:build"
    )
