"""``topk:F`` — keep the fraction ``F`` of elements with the largest ``|x|``, zero the rest.

The stage writes an index section followed by the kept values (in increasing index order), which
the next (value) stage encodes. ``k = clamp(floor(F * n + 0.5), 1, n)`` for ``n > 0`` elements and
0 for an empty tensor, so ``k`` — and with it every byte count — follows from the header alone.

Index section: whichever is smaller for this ``(n, k)`` (ties go to the bitmap):

* a **bitmap**, ``ceil(n / 8)`` bytes, bit ``i`` (little bit order) set when element ``i`` is kept;
* a **list** of the ``k`` increasing indices as little-endian unsigned ints of the smallest width
  (1, 2, 4 or 8 bytes) that holds ``n - 1``.

The layout is implied by ``(n, k)``, so no flag is stored and the decoder can check the exact size
of the section (and zstd's declared content size). A variable-length delta/varint coding would
save a little at some densities but would break that exactness; a following ``zstd`` stage
recovers most of the difference anyway (sorted fixed-width indices compress well).

The kept set is exactly the ``k`` largest ``|x|``; which of several equal magnitudes at the
threshold survive is decided by ``numpy.argpartition`` (deterministic for a given input and numpy
version). Large tensors preselect candidates with a sampled threshold first (see ``_top_mask``).
NaN/inf input is refused.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from edgesplit.codecs.base import Buffer, SparseStage, check_finite, min_max, register
from edgesplit.errors import CodecError

_WIDTHS = (1, 2, 4, 8)


def _index_width(n: int) -> int:
    for w in _WIDTHS:
        if n - 1 < 1 << (8 * w):
            return w
    raise CodecError(f"topk cannot index {n} elements")


def _check_fraction(value: float, source: str) -> float:
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise CodecError(f"topk fraction must be in (0, 1], got {source}")
    return value


# Below this many elements, or when keeping more than a quarter, a plain argpartition is as fast.
_SAMPLE_MIN_N = 1 << 16
_SAMPLE_SIZE = 1 << 12


def _top_mask(mag: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the ``k`` largest values of ``mag`` (exactly; ties deterministic).

    argpartition over a million elements costs ~10 ms. Instead, estimate the k-th largest value
    from a fixed strided sample, aiming low, keep the candidates at or above that estimate (a few
    more than ``k``) and select exactly among them. If the estimate turns out too high (fewer than
    ``k`` candidates) fall back to the full selection: the result is exact either way, because
    ``count(mag >= t) >= k`` holds exactly when ``t`` is at most the k-th largest value.
    """
    n = mag.size
    idx: np.ndarray | None = None
    if n >= _SAMPLE_MIN_N and 4 * k <= n:
        sample = mag[:: n // _SAMPLE_SIZE]
        # aim for ~1.25 k candidates plus a margin of 3 sampling standard deviations
        frac = k / n
        want = min(1.0, 1.25 * frac + 3.0 * math.sqrt(frac / sample.size))
        pos = max(0, sample.size - 1 - int(want * sample.size))
        threshold = np.partition(sample, pos)[pos]
        cand = np.flatnonzero(mag >= threshold)
        # (ties can make the candidates most of the tensor: then the full selection is cheaper)
        if k <= cand.size <= n // 2:
            keep = np.argpartition(mag[cand], cand.size - k)[cand.size - k :]
            idx = cand[keep]
    if idx is None:
        idx = np.argpartition(mag, n - k)[n - k :]
    # a mask and flatnonzero sort the indices in two linear passes (np.sort is n log n)
    mask = np.zeros(n, dtype=np.bool_)
    mask[idx] = True
    return mask


@register
@dataclass(frozen=True)
class TopK(SparseStage):
    """Magnitude top-k sparsification (values + indices)."""

    name: ClassVar[str] = "topk"
    stage_id: ClassVar[int] = 16

    fraction: float = 0.1

    @classmethod
    def from_args(cls, args: Sequence[str]) -> TopK:
        if len(args) != 1:
            raise CodecError(
                f"topk takes exactly one parameter, the kept fraction in (0, 1] (e.g. topk:0.1); "
                f"got {':'.join(args)!r}"
            )
        try:
            value = float(args[0])
        except ValueError:
            raise CodecError(f"topk fraction {args[0]!r} is not a number") from None
        return cls(_check_fraction(value, repr(args[0])))

    @classmethod
    def from_params(cls, params: bytes) -> TopK:
        if len(params) != 8:
            raise CodecError(
                f"topk stage params must be an 8-byte float64 fraction, the frame has "
                f"{len(params)} bytes"
            )
        (value,) = struct.unpack("<d", params)
        return cls(_check_fraction(value, repr(value)))

    def params(self) -> bytes:
        return struct.pack("<d", self.fraction)

    def spec(self) -> str:
        return f"{self.name}:{self.fraction!r}"

    # ---- sizes ------------------------------------------------------------------------------
    def kept(self, n: int) -> int:
        if n <= 0:
            return 0
        return min(n, max(1, math.floor(self.fraction * n + 0.5)))

    def _bitmap(self, n: int) -> bool:
        """True when the bitmap layout is used for ``n`` elements."""
        return (n + 7) // 8 <= _index_width(n) * self.kept(n)

    def index_size(self, n: int) -> int:
        if n == 0:
            return 0
        return min((n + 7) // 8, _index_width(n) * self.kept(n))

    # ---- select / scatter -------------------------------------------------------------------
    def select(self, x: np.ndarray) -> tuple[Buffer, np.ndarray]:
        flat = x.reshape(-1)
        n = flat.size
        if n == 0:
            return b"", np.zeros(0, dtype=np.float32)
        lo, hi = min_max(flat)
        check_finite(self.name, lo, hi, flat)
        k = self.kept(n)
        mask = np.ones(n, dtype=np.bool_) if k == n else _top_mask(np.abs(flat), k)
        idx = np.flatnonzero(mask)  # increasing; take() is faster than boolean indexing
        values = flat.take(idx)
        if self._bitmap(n):
            index = np.packbits(mask, bitorder="little")
        else:
            index = idx.astype(f"<u{_index_width(n)}")
        return index.data.cast("B"), values

    def scatter(self, index: Buffer, values: np.ndarray, n: int) -> np.ndarray:
        k = self.kept(n)
        if values.size != k:
            raise CodecError(f"topk expects {k} kept values for {n} elements, got {values.size}")
        if len(index) != self.index_size(n):
            raise CodecError(
                f"topk index section is {len(index)} bytes; {n} elements imply {self.index_size(n)}"
            )
        out = np.zeros(n, dtype=np.float32)
        if n == 0:
            return out
        if self._bitmap(n):
            # np.frombuffer only, never allow_pickle.
            bits = np.unpackbits(np.frombuffer(index, dtype=np.uint8), bitorder="little")
            if bits[n:].any():
                raise CodecError("topk bitmap has bits set past the last element")
            mask = bits[:n].view(np.bool_)
            count = int(np.count_nonzero(mask))
            if count != k:
                raise CodecError(f"topk bitmap marks {count} elements; {n} elements imply {k}")
            out[mask] = values
        else:
            # np.frombuffer only, never allow_pickle.
            idx = np.frombuffer(index, dtype=f"<u{_index_width(n)}").astype(np.int64)
            if int(idx[-1]) >= n:
                raise CodecError(f"topk index {int(idx[-1])} is out of range for {n} elements")
            if k > 1 and not (np.diff(idx) > 0).all():
                raise CodecError("topk indices are not strictly increasing")
            out[idx] = values
        return out
