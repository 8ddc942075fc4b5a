"""Affine quantizers ``q8``, ``q4``, ``q2``, ``q1`` with real bit-packing.

A tensor is mapped to integer codes ``c = round((x - lo) / scale)`` with ``scale = (hi - lo) /
(2**bits - 1)``, and decoded as ``lo + c * scale``. Codes are packed ``8 / bits`` to a byte, first
element in the low bits, so ``n`` elements cost ``ceil(n * bits / 8)`` bytes plus the scales.

Payload layout (little-endian)::

    lo: G x f32 | scale: G x f32 | packed codes: ceil(n * bits / 8) bytes

``G`` is 1, or with ``:channel`` the size of axis 1 for tensors of ``ndim >= 2`` (axis 0 is the
batch); a tensor of ``ndim < 2`` has no channel axis and gets one global ``(lo, scale)``. An empty
tensor has an empty payload (no scales). Options:

* ``channel`` — one ``(lo, scale)`` per channel of axis 1.
* ``stochastic`` — ``c = floor((x - lo) / scale + u)``, ``u ~ U[0, 1)``: unbiased, error < one
  step. Deterministic rounding has error <= half a step. The uniform draws come from the
  ``numpy.random.Generator`` passed to ``encode`` (seed it for reproducible frames).

A constant tensor (``hi == lo``) has ``scale = 0`` and decodes exactly. NaN/inf input, and ranges
whose width overflows float32, are refused with a :class:`~edgesplit.errors.CodecError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from edgesplit.codecs.base import (
    Buffer,
    Shape,
    ValueStage,
    check_finite,
    element_count,
    parse_flags,
    register,
)
from edgesplit.errors import CodecError

_FLAG_CHANNEL = 0x01
_FLAG_STOCHASTIC = 0x02
_KNOWN_FLAGS = _FLAG_CHANNEL | _FLAG_STOCHASTIC
_OPTIONS = ("channel", "stochastic")
# Widest range a quantizer accepts: a hair under float32's max, so that lo + code * scale, rounded
# in float32, can never round up to inf (on either side of the wire).
_RANGE_LIMIT = float(np.finfo(np.float32).max) * (1.0 - 2.0**-20)


def _pack(codes: np.ndarray, bits: int, dst: np.ndarray) -> None:
    """Pack uint8 ``codes`` (length a multiple of ``8 // bits``, tail zero) into ``dst``.

    Works on whole machine words instead of strided byte slices: viewing 2 (or 4) codes as one
    little-endian u16 (u32) lets two shifts and ORs move every code into the low byte at once.
    """
    if bits == 8:
        dst[...] = codes
    elif bits == 4:
        v = codes.view("<u2")  # c0 | c1 << 8
        t = np.right_shift(v, 4)
        np.bitwise_or(t, v, out=t)  # low byte: c0 | c1 << 4
        np.copyto(dst, t, casting="unsafe")  # keep the low byte
    elif bits == 2:
        v = codes.view("<u4")  # c0 | c1 << 8 | c2 << 16 | c3 << 24
        t = np.right_shift(v, 6)
        np.bitwise_or(t, v, out=t)  # bytes 0 and 2: c0|c1<<2, c2|c3<<2
        u = np.right_shift(t, 12)
        np.bitwise_or(u, t, out=u)  # low byte: c0|c1<<2|c2<<4|c3<<6
        np.copyto(dst, u, casting="unsafe")
    else:  # bits == 1
        dst[...] = np.packbits(codes, bitorder="little")


def _unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`_pack`: ``n`` uint8 codes; padding bits must be zero."""
    m = packed.size
    if bits == 8:
        return packed
    if bits == 4:
        t = packed.astype("<u2")
        s = np.left_shift(t, 4)
        np.bitwise_or(s, t, out=s)
        np.bitwise_and(s, 0x0F0F, out=s)
        codes = s.view(np.uint8)
    elif bits == 2:
        t = packed.astype("<u4")
        s = np.left_shift(t, 12)
        np.bitwise_or(s, t, out=s)
        np.bitwise_and(s, 0x000F000F, out=s)
        u = np.left_shift(s, 6)
        np.bitwise_or(u, s, out=u)
        np.bitwise_and(u, 0x03030303, out=u)
        codes = u.view(np.uint8)
    else:
        codes = np.unpackbits(packed, bitorder="little")
    if codes.size != m * (8 // bits):
        raise CodecError(f"q{bits} unpacking produced {codes.size} codes from {m} bytes")
    if n < codes.size and codes[n:].any():
        raise CodecError(f"q{bits} payload has non-zero padding bits after its {n} codes")
    return codes[:n]


@dataclass(frozen=True)
class _Quant(ValueStage):
    """Shared implementation; the registered subclasses only fix ``bits``, name and id."""

    bits: ClassVar[int]
    channel: bool = False
    stochastic: bool = False

    # ---- spec and params --------------------------------------------------------------------
    @classmethod
    def from_args(cls, args: Sequence[str]) -> _Quant:
        flags = parse_flags(cls.name, args, _OPTIONS)
        return cls(channel="channel" in flags, stochastic="stochastic" in flags)

    @classmethod
    def from_params(cls, params: bytes) -> _Quant:
        if len(params) != 1:
            raise CodecError(
                f"{cls.name} stage params must be 1 flags byte, the frame has {len(params)} bytes"
            )
        flags = params[0]
        if flags & ~_KNOWN_FLAGS:
            raise CodecError(
                f"{cls.name} flags byte 0x{flags:02x} has unknown bits; known: "
                f"0x{_FLAG_CHANNEL:02x} channel, 0x{_FLAG_STOCHASTIC:02x} stochastic"
            )
        return cls(channel=bool(flags & _FLAG_CHANNEL), stochastic=bool(flags & _FLAG_STOCHASTIC))

    def params(self) -> bytes:
        flags = (_FLAG_CHANNEL if self.channel else 0) | (
            _FLAG_STOCHASTIC if self.stochastic else 0
        )
        return bytes([flags])

    def spec(self) -> str:
        opts = [o for o, on in zip(_OPTIONS, (self.channel, self.stochastic), strict=True) if on]
        return f"{self.name}:{','.join(opts)}" if opts else self.name

    @property
    def needs_shape(self) -> bool:
        return self.channel

    # ---- sizes ------------------------------------------------------------------------------
    @property
    def levels(self) -> int:
        """Largest code, ``2**bits - 1``."""
        return (1 << self.bits) - 1

    def groups(self, shape: Shape) -> int:
        """Number of ``(lo, scale)`` pairs for a non-empty tensor of ``shape``."""
        return int(shape[1]) if self.channel and len(shape) >= 2 else 1

    def packed_size(self, n: int) -> int:
        return (n * self.bits + 7) // 8

    def encoded_size(self, shape: Shape) -> int:
        n = element_count(shape)
        if n == 0:
            return 0
        return 8 * self.groups(shape) + self.packed_size(n)

    # ---- quantize / dequantize --------------------------------------------------------------
    def _bshape(self, shape: Shape) -> Shape:
        """Shape the per-group arrays broadcast with (axis 1 in channel mode)."""
        if self.channel and len(shape) >= 2:
            return (1, int(shape[1])) + (1,) * (len(shape) - 2)
        return (1,) * len(shape)

    def _ranges(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-group (lo, scale) as float32 arrays of length G."""
        if self.channel and x.ndim >= 2:
            axes = (0,) + tuple(range(2, x.ndim))
            lo = x.min(axis=axes)
            hi = x.max(axis=axes)
            glo, ghi = float(lo.min()), float(hi.max())
        else:
            glo, ghi = float(x.min()), float(x.max())
            lo = np.array([glo], dtype=np.float32)
            hi = np.array([ghi], dtype=np.float32)
        check_finite(self.name, glo, ghi, x)
        lo64 = lo.astype(np.float64)
        span = hi.astype(np.float64) - lo64
        scale = (span / self.levels).astype(np.float32)
        top = lo64 + scale.astype(np.float64) * self.levels
        if float(span.max()) > _RANGE_LIMIT or float(np.abs(top).max()) > _RANGE_LIMIT:
            raise CodecError(
                f"{self.name} cannot quantize the value range [{glo:.6g}, {ghi:.6g}]: its width "
                "overflows float32"
            )
        return lo.astype(np.float32), scale

    def _quantize(
        self,
        x: np.ndarray,
        lo: np.ndarray,
        scale: np.ndarray,
        codes: np.ndarray,
        rng: np.random.Generator | None,
    ) -> None:
        """Write the codes of float32 ``x`` (C order) into the uint8 vector ``codes``."""
        bshape = self._bshape(x.shape)
        lo_b = lo.reshape(bshape)
        scale64 = scale.astype(np.float64)
        with np.errstate(divide="ignore"):
            inv64 = np.where(scale64 > 0, 1.0 / scale64, 0.0)
        # A range of a few subnormals has 1/scale beyond float32: scale in float64 then (rare).
        work = np.float32 if float(inv64.max()) <= _RANGE_LIMIT else np.float64
        inv_b = inv64.astype(work).reshape(bshape)
        if self.bits == 1 and not self.stochastic:
            # One comparison instead of subtract/scale/round: code 1 iff x >= lo + scale / 2.
            # (A constant group has scale 0 and mid == lo: every code is 1 and decodes to lo.)
            mid = (lo + np.float32(0.5) * scale).reshape(bshape)
            np.greater_equal(x, mid, out=codes.reshape(x.shape).view(np.bool_))
            return
        buf = np.empty(x.shape, dtype=work)
        # ReLU activations have lo == 0: skipping the subtraction saves a full pass.
        if lo.size == 1 and float(lo[0]) == 0.0:
            np.multiply(x, inv_b, out=buf)
        else:
            np.subtract(x, lo_b, out=buf)
            np.multiply(buf, inv_b, out=buf)
        if self.stochastic:
            if rng is None:
                raise CodecError(f"{self.spec()} needs a numpy Generator for its random rounding")
            buf += rng.random(x.shape, dtype=np.float32)
            # float rounding can push the top value a hair over the last level
            np.minimum(buf, work(self.levels), out=buf)
        else:
            # values are >= 0, so +0.5 then the truncating cast rounds to nearest (no np.rint)
            buf += work(0.5)
        np.copyto(codes.reshape(x.shape), buf, casting="unsafe")

    def _dequantize(
        self, codes: np.ndarray, lo: np.ndarray, scale: np.ndarray, shape: Shape
    ) -> np.ndarray:
        bshape = self._bshape(shape)
        out = np.empty(shape, dtype=np.float32)
        np.multiply(codes.reshape(shape), scale.reshape(bshape), out=out)
        if lo.size != 1 or float(lo[0]) != 0.0:
            np.add(out, lo.reshape(bshape), out=out)
        return out

    # ---- the stage API ----------------------------------------------------------------------
    def encode(self, x: np.ndarray, rng: np.random.Generator | None = None) -> Buffer:
        n = x.size
        if n == 0:
            return b""
        lo, scale = self._ranges(x)
        g = lo.size
        packed = self.packed_size(n)
        out = np.empty(8 * g + packed, dtype=np.uint8)
        out[: 4 * g].view("<f4")[...] = lo
        out[4 * g : 8 * g].view("<f4")[...] = scale
        if self.bits == 8:
            # quantize straight into the payload: no separate code buffer, no copy
            self._quantize(x, lo, scale, out[8 * g :], rng)
        else:
            per = 8 // self.bits
            codes = np.empty(packed * per, dtype=np.uint8)
            codes[n:] = 0
            self._quantize(x, lo, scale, codes[:n], rng)
            _pack(codes, self.bits, out[8 * g :])
        return out.data

    def decode(self, data: Buffer, shape: Shape) -> np.ndarray:
        n = element_count(shape)
        want = self.encoded_size(shape)
        if len(data) != want:
            raise CodecError(
                f"{self.spec()} payload is {len(data)} bytes; shape {tuple(shape)} implies {want}"
            )
        if n == 0:
            return np.zeros(shape, dtype=np.float32)
        g = self.groups(shape)
        # np.frombuffer only, never allow_pickle.
        raw = np.frombuffer(data, dtype=np.uint8)
        lo = raw[: 4 * g].view("<f4").astype(np.float32)
        scale = raw[4 * g : 8 * g].view("<f4").astype(np.float32)
        if not (np.isfinite(lo).all() and np.isfinite(scale).all()):
            raise CodecError(f"{self.spec()} payload has a NaN or inf lo/scale")
        if (scale < 0).any():
            raise CodecError(f"{self.spec()} payload has a negative scale {float(scale.min())}")
        # every decoded value lies in [lo, lo + levels * scale]; both ends must be float32
        top = lo.astype(np.float64) + scale.astype(np.float64) * self.levels
        if (np.abs(top) > _RANGE_LIMIT).any():
            raise CodecError(
                f"{self.spec()} payload's lo + scale * {self.levels} overflows float32"
            )
        codes = _unpack(raw[8 * g :], self.bits, n)
        return self._dequantize(codes, lo, scale, shape)

    def roundtrip(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        # Same codes and the same dequantization as encode -> decode, minus the bit-packing.
        if x.size == 0:
            return np.zeros(x.shape, dtype=np.float32)
        lo, scale = self._ranges(x)
        codes = np.empty(x.size, dtype=np.uint8)
        self._quantize(x, lo, scale, codes, rng)
        return self._dequantize(codes, lo, scale, x.shape)


@register
@dataclass(frozen=True)
class Q8(_Quant):
    """8-bit affine quantization (one byte per element)."""

    name: ClassVar[str] = "q8"
    stage_id: ClassVar[int] = 8
    bits: ClassVar[int] = 8


@register
@dataclass(frozen=True)
class Q4(_Quant):
    """4-bit affine quantization, two codes per byte."""

    name: ClassVar[str] = "q4"
    stage_id: ClassVar[int] = 9
    bits: ClassVar[int] = 4


@register
@dataclass(frozen=True)
class Q2(_Quant):
    """2-bit affine quantization, four codes per byte."""

    name: ClassVar[str] = "q2"
    stage_id: ClassVar[int] = 10
    bits: ClassVar[int] = 2


@register
@dataclass(frozen=True)
class Q1(_Quant):
    """1-bit affine quantization (each element becomes lo or hi), eight codes per byte."""

    name: ClassVar[str] = "q1"
    stage_id: ClassVar[int] = 11
    bits: ClassVar[int] = 1


__all__ = ["Q1", "Q2", "Q4", "Q8"]
