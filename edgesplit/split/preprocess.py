"""Input normalization that travels with the model.

:class:`Standardize` is the first module of every client segment: ``(x - mean) / std`` with
statistics fitted on that client's (that party's) own training rows. It is part of the segment,
so it is saved in checkpoints and compiled into ``client.onnx``: a device feeds its raw readings
(a lab value of 1,680, a pixel of 16) and never has to know how they were scaled.

Statistics are per feature for tabular samples ``(F,)``, per channel for signals and images
``(C, ...)``, one pair for single-channel images ``(H, W)`` — scaling each pixel by its own
spread would blow up pixels that are almost always dark.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

#: Spreads below this (constant features) are treated as 1: the feature is only centred.
_MIN_STD = 1e-6


class Standardize(nn.Module):
    """``(x - mean) / std`` with fixed (buffer) statistics, broadcast over the batch."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"stats_shape={tuple(self.mean.shape)}"


def stats_axes(sample_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Axes of a batch ``(N, *sample_shape)`` the statistics are taken over."""
    if len(sample_shape) == 1:
        return (0,)  # per feature
    if len(sample_shape) == 2 and sample_shape[0] > 16 and sample_shape[1] > 16:
        return (0, 1, 2)  # a single-channel (H, W) image: one pair
    return (0, *range(2, len(sample_shape) + 1))  # per channel of (C, ...)


def fit_standardize(x: np.ndarray) -> Standardize:
    """A :class:`Standardize` fitted on the rows ``x`` (``(N, *sample_shape)``)."""
    x64 = np.asarray(x, dtype=np.float64)
    axes = stats_axes(tuple(x64.shape[1:]))
    mean = x64.mean(axis=axes, keepdims=True)[0]
    std = x64.std(axis=axes, keepdims=True)[0]
    std = np.where(std > _MIN_STD, std, 1.0)
    return Standardize(mean.astype(np.float32), std.astype(np.float32))


def with_standardize(lower: nn.Module, sample_shape: tuple[int, ...]) -> nn.Sequential:
    """``lower`` preceded by a :class:`Standardize` (named ``standardize``, identity until
    :func:`refit` or a state dict gives it statistics)."""
    layers = [("standardize", placeholder(sample_shape)), ("lower", lower)]
    return nn.Sequential(OrderedDict(layers))


def placeholder(sample_shape: tuple[int, ...]) -> Standardize:
    """An identity :class:`Standardize` of the right shape, to be fitted or loaded later
    (a checkpoint or a hand-off brings the statistics)."""
    return fit_standardize(np.zeros((1, *sample_shape), dtype=np.float32))


def refit(segment: nn.Module, x: np.ndarray) -> None:
    """Fit the :class:`Standardize` that starts ``segment`` on the rows ``x``, in place
    (nothing to do for a segment without one)."""
    layer = next((m for m in segment.modules() if isinstance(m, Standardize)), None)
    if layer is None:
        return
    fitted = fit_standardize(x)
    layer.mean.copy_(fitted.mean)
    layer.std.copy_(fitted.std)


def without_standardize(segment: nn.Module) -> tuple[nn.Module, Standardize | None]:
    """A copy of ``segment`` whose :class:`Standardize` is an identity, and that layer: for
    graphs that take standardized input (the device's training graphs standardize in numpy)."""
    import copy

    core = copy.deepcopy(segment)
    for name, module in core.named_modules():
        if isinstance(module, Standardize):
            parent_name, _, child = name.rpartition(".")
            parent = core.get_submodule(parent_name) if parent_name else core
            setattr(parent, child, nn.Identity())
            return core, module
    return core, None


def stats_json(layer: Standardize | None) -> dict[str, object] | None:
    """``{"mean": nested list, "std": nested list}`` of ``layer`` (``None`` without one)."""
    if layer is None:
        return None
    return {"mean": layer.mean.numpy().tolist(), "std": layer.std.numpy().tolist()}


#: Without the training rows, the drift ranges are the standardization's mean ± this many spreads:
#: loose on purpose — sparse features (a digits pixel that is almost always 0) reach 21 spreads
#: in held-out data — so it catches unit and scale errors (inputs ×16), not subtle shifts.
RANGE_SIGMAS = 16.0


def input_ranges(
    x: np.ndarray | None, layer: Standardize | None = None
) -> dict[str, object] | None:
    """What the training inputs looked like, for the device's drift check
    (:mod:`edgesplit.edge.drift`): per feature (per channel, ...: the axes of
    :func:`stats_axes`) the smallest and largest value seen in the rows ``x``
    (``(N, *sample_shape)``), and the mean and spread — the :class:`Standardize` layer's own
    statistics when there is one (what the model was fitted with), else those of ``x``.

    Without rows (an export from a checkpoint alone) the range is the layer's mean ±
    :data:`RANGE_SIGMAS` spreads, and ``basis`` says so; without either, ``None``.

    The arrays keep the reduced axes (shape ``(F,)`` or ``(C, 1, 1)``), so they broadcast
    against a batch as they are. All values are finite floats (JSON has no infinities).
    """
    if x is None:
        if layer is None:
            return None
        mean = layer.mean.numpy().astype(np.float64)
        std = layer.std.numpy().astype(np.float64)
        return {
            "min": (mean - RANGE_SIGMAS * std).tolist(),
            "max": (mean + RANGE_SIGMAS * std).tolist(),
            "mean": mean.tolist(),
            "std": std.tolist(),
            "samples": 0,
            "basis": f"mean ± {RANGE_SIGMAS:g} std of the input standardization",
        }
    rows = np.asarray(x)
    if rows.ndim < 2 or not len(rows):
        raise ValueError(f"input ranges need rows (N, *sample_shape), got shape {rows.shape}")
    axes = stats_axes(tuple(rows.shape[1:]))
    # in chunks of ~16M values: a float64 copy of a whole image dataset would not fit in memory
    step = max(1, (1 << 24) // max(1, int(np.prod(rows.shape[1:]))))
    lo = hi = total = squares = count = None
    for start in range(0, len(rows), step):
        chunk = np.asarray(rows[start : start + step], dtype=np.float64)
        finite = np.isfinite(chunk)  # NaN and inf rows say nothing about the range
        parts = (
            np.min(np.where(finite, chunk, np.inf), axis=axes, keepdims=True)[0],
            np.max(np.where(finite, chunk, -np.inf), axis=axes, keepdims=True)[0],
            np.sum(np.where(finite, chunk, 0.0), axis=axes, keepdims=True)[0],
            np.sum(np.where(finite, chunk, 0.0) ** 2, axis=axes, keepdims=True)[0],
            np.sum(finite, axis=axes, keepdims=True)[0],
        )
        if lo is None or hi is None or total is None or squares is None or count is None:
            lo, hi, total, squares, count = parts
        else:
            lo, hi = np.minimum(lo, parts[0]), np.maximum(hi, parts[1])
            total, squares, count = total + parts[2], squares + parts[3], count + parts[4]
    if lo is None or hi is None or total is None or squares is None or count is None:
        raise ValueError("input ranges need at least one row")  # unreachable: len(rows) > 0
    if layer is not None:
        mean, std = layer.mean.numpy().astype(np.float64), layer.std.numpy().astype(np.float64)
    else:
        n = np.maximum(count, 1)
        mean = total / n
        std = np.sqrt(np.maximum(squares / n - mean**2, 0.0))
    arrays = [np.where(np.isfinite(a), a, 0.0) for a in (lo, hi, mean, std)]
    return {
        "min": arrays[0].tolist(),
        "max": arrays[1].tolist(),
        "mean": arrays[2].tolist(),
        "std": arrays[3].tolist(),
        "samples": int(len(rows)),
        "basis": "training rows",
    }


def standardize_layer(segment: nn.Module) -> Standardize | None:
    """The :class:`Standardize` that starts ``segment``, if it has one."""
    return next((m for m in segment.modules() if isinstance(m, Standardize)), None)
