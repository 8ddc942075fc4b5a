"""Input drift on the device: incoming batches against the ranges the training inputs spanned.

The exporter records, per feature (per channel of an image or signal), the smallest and largest
training value and the mean and spread (manifest key ``input_ranges``, see
:func:`edgesplit.split.preprocess.input_ranges`). A device whose sensor changed units, whose
camera pipeline stopped scaling to 0..1, or that feeds integer counts ×16 produces inputs far
outside them; the model still answers, silently wrong. :class:`DriftMonitor` compares each batch
with the ranges and logs one warning line naming the feature(s), the recorded range and what was
seen — at most once per ``every`` batches, so a drifting stream does not flood the log.

A value counts as out of range when it lies more than ``margin`` × (the feature's training span,
or its spread when the span is zero) beyond the recorded min or max: test data from the training
distribution overshoots the training extremes a little, and must not warn. Non-finite inputs
always count.

torch-free (numpy only), like the rest of :mod:`edgesplit.edge`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgesplit.errors import ConfigError

log = logging.getLogger(__name__)

#: Tolerance beyond the recorded range, as a fraction of the feature's training span.
DEFAULT_MARGIN = 0.25
#: At most one warning per this many batches.
DEFAULT_EVERY = 100
#: Features a warning line names before summarising the rest.
_NAMED = 3
#: Keys of ``input_ranges`` that hold per-feature arrays (``samples`` is a count).
RANGE_KEYS = ("min", "max")
STAT_KEYS = ("mean", "std")


@dataclass(frozen=True)
class Drift:
    """One batch's inputs outside the training ranges.

    Attributes
    ----------
    features: flat indices (into the per-feature arrays) that left their range.
    low, high: the recorded training range of each of them.
    seen_low, seen_high: the batch's smallest and largest value of each of them.
    fraction: share of the batch's values that were out of range (over all features).
    unit: what one range covers: ``feature`` (tabular) or ``channel`` (images, signals).
    """

    features: tuple[int, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    seen_low: tuple[float, ...]
    seen_high: tuple[float, ...]
    fraction: float
    unit: str = "feature"

    def describe(self, what: str = "input") -> str:
        """One line: the first few features, their range and what was seen."""
        parts = [
            f"{self.unit} {f} trained on [{lo:.4g}, {hi:.4g}], seen [{a:.4g}, {b:.4g}]"
            for f, lo, hi, a, b in zip(
                self.features, self.low, self.high, self.seen_low, self.seen_high, strict=True
            )
        ][:_NAMED]
        more = len(self.features) - _NAMED
        tail = f" (+{more} more {self.unit}{'s' if more > 1 else ''})" if more > 0 else ""
        return (
            f"{what} drift: {'; '.join(parts)}{tail}; {self.fraction:.1%} of the batch's "
            "values are outside the training ranges (check the device's units and scaling)"
        )


def validate_ranges(ranges: Any, sample_shape: tuple[int, ...], where: str) -> None:
    """Raise :class:`ConfigError` unless ``ranges`` is a valid ``input_ranges`` for samples of
    ``sample_shape`` (the message names the key and what would be right)."""
    if not isinstance(ranges, Mapping):
        raise ConfigError(
            f"{where}: key 'input_ranges' must be an object, got {type(ranges).__name__}"
        )
    arrays: dict[str, np.ndarray] = {}
    for key in (*RANGE_KEYS, *STAT_KEYS):
        if key not in ranges:
            if key in STAT_KEYS:
                continue
            raise ConfigError(f"{where}: missing required key 'input_ranges.{key}'")
        try:
            arr = np.asarray(ranges[key], dtype=np.float64)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{where}: key 'input_ranges.{key}' must be a (nested) list of "
                f"numbers, got {ranges[key]!r:.60}"
            ) from None
        if not np.isfinite(arr).all():
            raise ConfigError(f"{where}: key 'input_ranges.{key}' holds non-finite values")
        try:
            full = np.broadcast_shapes((1, *sample_shape), (1, *arr.shape))
        except ValueError:
            full = None
        if full != (1, *sample_shape) or arr.ndim > len(sample_shape):
            raise ConfigError(
                f"{where}: key 'input_ranges.{key}' has shape {arr.shape}, which "
                f"does not broadcast to one sample {sample_shape} (per feature: "
                "(F,), per channel: (C, 1, 1))"
            )
        arrays[key] = arr
    if arrays["min"].shape != arrays["max"].shape:
        raise ConfigError(
            f"{where}: keys 'input_ranges.min' and 'input_ranges.max' have "
            f"shapes {arrays['min'].shape} and {arrays['max'].shape}; they must "
            "match"
        )
    if (arrays["min"] > arrays["max"]).any():
        raise ConfigError(
            f"{where}: 'input_ranges.min' exceeds 'input_ranges.max' for some feature"
        )
    if "std" in arrays and (arrays["std"] < 0).any():
        raise ConfigError(f"{where}: 'input_ranges.std' must be ≥ 0")


class DriftMonitor:
    """Checks batches against recorded ``input_ranges``; logs at most once per ``every``.

    Parameters
    ----------
    ranges: the manifest's ``input_ranges`` (validated with :func:`validate_ranges`).
    name: how log lines name the source (the bundle's name).
    margin: tolerance beyond the recorded range, as a fraction of the training span.
    every: at most one warning per this many batches (the first drifting batch warns).
    sample_ndim: dimensions of one sample, when the arrays may have fewer (they broadcast).
    """

    def __init__(
        self,
        ranges: Mapping[str, Any],
        name: str,
        *,
        margin: float = DEFAULT_MARGIN,
        every: int = DEFAULT_EVERY,
        sample_ndim: int | None = None,
    ) -> None:
        if not margin >= 0 or every < 1:
            raise ConfigError(f"drift margin must be ≥ 0 and every ≥ 1, got {margin}, {every}")
        self.low = np.asarray(ranges["min"], dtype=np.float64)
        self.high = np.asarray(ranges["max"], dtype=np.float64)
        if sample_ndim is not None and self.low.ndim < sample_ndim:
            # (F,)-style arrays for a (C, H, W) sample: make the broadcast axes explicit
            lead = (1,) * (sample_ndim - self.low.ndim)
            self.low, self.high = (
                self.low.reshape(lead + self.low.shape),
                self.high.reshape(lead + self.high.shape),
            )
        span = self.high - self.low
        std = np.broadcast_to(np.asarray(ranges.get("std", 0.0), dtype=np.float64), span.shape)
        # a constant training feature has no span: fall back to its spread, else to 1 unit
        span = np.where(span > 0, span, np.where(std > 0, std, 1.0))
        self.lo_limit = self.low - margin * span
        self.hi_limit = self.high + margin * span
        self.name = name
        self.every = every
        self.batches = 0
        self.drifted = 0  # batches that drifted, warned or not
        self.warnings = 0
        self._last_warning: int | None = None
        self._limits: dict[np.dtype, tuple[np.ndarray, np.ndarray]] = {}

    def check(self, x: np.ndarray) -> Drift | None:
        """Compare a batch ``(N, *sample_shape)`` with the ranges; warn if due. Returns the
        drift found (``None`` when every value is in range)."""
        self.batches += 1
        x = np.asarray(x)
        if x.dtype.kind != "f":  # integer readings: compare exactly, as floats
            x = x.astype(np.float64)
        # in the input's own dtype (float32): no float64 copy of every batch on the device
        lo, hi = self._limits.get(x.dtype) or self._limits.setdefault(
            x.dtype, (self.lo_limit.astype(x.dtype), self.hi_limit.astype(x.dtype))
        )
        bad = ~np.isfinite(x) | (x < lo) | (x > hi)
        if not bad.any():
            return None
        x64 = x.astype(np.float64)
        self.drifted += 1
        # per feature: reduce the batch axis and every axis the ranges broadcast over
        axes = (0, *(i + 1 for i, d in enumerate(self.low.shape) if d == 1))
        per_feature = bad.any(axis=axes).reshape(-1)
        finite = np.where(np.isfinite(x64), x64, np.nan)
        with warnings.catch_warnings():  # a feature with no finite value: nan, said as such
            warnings.simplefilter("ignore", RuntimeWarning)
            seen_lo = np.nanmin(finite, axis=axes).reshape(-1)
            seen_hi = np.nanmax(finite, axis=axes).reshape(-1)
        idx = np.flatnonzero(per_feature)
        low, high = self.low.reshape(-1), self.high.reshape(-1)
        drift = Drift(
            tuple(int(i) for i in idx),
            tuple(float(low[i]) for i in idx),
            tuple(float(high[i]) for i in idx),
            tuple(float(seen_lo[i]) for i in idx),
            tuple(float(seen_hi[i]) for i in idx),
            float(bad.mean()),
            "feature" if self.low.ndim == 1 else "channel",
        )
        if self._last_warning is None or self.batches - self._last_warning >= self.every:
            self._last_warning = self.batches
            self.warnings += 1
            quiet = (
                f" (next warning after {self.every} batches at the earliest)"
                if self.every > 1
                else ""
            )
            log.warning("%s%s", drift.describe(f"{self.name}: input"), quiet)
        return drift
