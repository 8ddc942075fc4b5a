"""Floating-point value stages: ``fp32`` (identity baseline), ``fp16`` and ``bf16``.

All three refuse NaN/inf input, and refuse finite values the narrow format would turn into inf
(``|x| >= 65520`` for fp16), so a decoded tensor is always finite. Their decoders refuse payloads
holding NaN/inf bit patterns for the same reason: a peer cannot smuggle non-finite values into the
receiver's training step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import numpy as np

from edgesplit.codecs.base import (
    Buffer,
    Shape,
    ValueStage,
    check_finite,
    element_count,
    min_max,
    register,
)
from edgesplit.errors import CodecError

# fp16 rounds |x| >= 65520 (max 65504 plus half a step) to inf.
_FP16_OVERFLOW = 65520.0
# bf16 rounds |x| >= this (bit pattern 0x7F7F8000, a tie that rounds to even = inf) to inf.
_BF16_OVERFLOW = float(np.array(0x7F7F8000, dtype=np.uint32).view(np.float32))


def _check_size(name: str, data: Buffer, shape: Shape, itemsize: int) -> int:
    n = element_count(shape)
    if len(data) != n * itemsize:
        raise CodecError(
            f"{name} payload is {len(data)} bytes; shape {tuple(shape)} implies {n * itemsize}"
        )
    return n


def _check_range(name: str, x: np.ndarray, overflow: float | None) -> None:
    if x.size == 0:
        return
    lo, hi = min_max(x)
    check_finite(name, lo, hi, x)
    if overflow is not None and max(-lo, hi) >= overflow:
        raise CodecError(
            f"{name} cannot carry |x| = {max(-lo, hi):.6g}: it overflows to inf at "
            f"{overflow:.6g}; use a wider stage (bf16 or fp32) or a quantizer"
        )


def _check_decoded(name: str, out: np.ndarray) -> np.ndarray:
    if out.size:
        lo, hi = min_max(out)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise CodecError(f"{name} payload holds NaN or inf values; encoders never write them")
    return out


def _le_bytes(a: np.ndarray) -> memoryview:
    """A flat byte view of ``a`` in little-endian order (a copy only on big-endian hosts)."""
    le = a.astype(a.dtype.newbyteorder("<"), copy=False)
    return np.ascontiguousarray(le).reshape(-1).view(np.uint8).data


_P = TypeVar("_P", bound="_Parameterless")


class _Parameterless(ValueStage):
    """A value stage without spec arguments or frame params: its spec is its name."""

    @classmethod
    def from_args(cls: type[_P], args: Sequence[str]) -> _P:
        cls._no_args(args)
        return cls()

    @classmethod
    def from_params(cls: type[_P], params: bytes) -> _P:
        cls._no_params(params)
        return cls()

    def params(self) -> bytes:
        return b""

    def spec(self) -> str:
        return self.name


@register
@dataclass(frozen=True)
class Fp32(_Parameterless):
    """Raw little-endian float32: the identity baseline every ratio is measured against."""

    name: ClassVar[str] = "fp32"
    stage_id: ClassVar[int] = 1

    def encoded_size(self, shape: Shape) -> int:
        return 4 * element_count(shape)

    def encode(self, x: np.ndarray, rng: np.random.Generator | None = None) -> Buffer:
        _check_range(self.name, x, None)
        return _le_bytes(x)

    def decode(self, data: Buffer, shape: Shape) -> np.ndarray:
        n = _check_size(self.name, data, shape, 4)
        # np.frombuffer only, never allow_pickle; astype copies into a writable native array.
        out = np.frombuffer(data, dtype="<f4", count=n).astype(np.float32).reshape(shape)
        return _check_decoded(self.name, out)

    def roundtrip(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        _check_range(self.name, x, None)
        return x.copy()


_U32 = np.uint32
# 0.5 as float32 bits: adding it to |x| < 2**-14 leaves round(|x| * 2**24) in the low mantissa
# bits, rounded to nearest even by the FPU — exactly fp16's subnormal encoding.
_F16_DENORM_MAGIC = np.array(((127 - 15) + (23 - 10) + 1) << 23, dtype=np.uint32)
# rebias the exponent (127 -> 15) and add the 0xFFF of round-to-nearest in one constant
_F16_REBIAS = _U32((((15 - 127) << 23) + 0xFFF) & 0xFFFFFFFF)


def _to_fp16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> IEEE half bit patterns, round to nearest even; same bits as numpy's cast.

    numpy's own cast is scalar code that is slowest on zeros (half of every ReLU output); this
    does it in a dozen vectorised integer passes. Inputs are finite and below 65520 (checked by
    the caller), so the inf/NaN cases of the general algorithm (F. Giesen, "float_to_half_fast3")
    are not needed.
    """
    u = np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32)
    a = np.bitwise_and(u, _U32(0x7FFFFFFF))
    # normal halves: add 0xFFF + the lowest kept bit, then drop 13 mantissa bits
    n = np.right_shift(a, 13)
    n &= _U32(1)
    n += a
    n += _F16_REBIAS
    n >>= _U32(13)
    # subnormal halves (|x| < 2**-14, zeros included): the float adder does the rounding
    s = np.add(a.view(np.float32), _F16_DENORM_MAGIC.view(np.float32)).view(np.uint32)
    s -= _F16_DENORM_MAGIC
    # branch-free select (np.where is several times slower here): m = all ones where subnormal
    m = np.less(a, _U32(113 << 23)).view(np.uint8).astype(np.uint32)
    np.negative(m, out=m)
    s &= m
    np.invert(m, out=m)
    n &= m
    n |= s
    np.right_shift(u, 16, out=s)
    s &= _U32(0x8000)
    n |= s
    return n.astype("<u2")


_FP16_TABLE: np.ndarray | None = None


def _from_fp16_bits(bits: np.ndarray) -> np.ndarray:
    """IEEE half bit patterns -> float32 through a 65536-entry table (256 KiB, built once): one
    gather instead of numpy's scalar cast, exact by construction."""
    global _FP16_TABLE
    if _FP16_TABLE is None:
        _FP16_TABLE = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
        _FP16_TABLE = _FP16_TABLE.astype(np.float32)
    return np.take(_FP16_TABLE, bits.astype(np.intp, copy=False))


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounding to nearest, ties to even.

    Adding ``0x7FFF + lsb`` to the fp32 bits and dropping the low half rounds the mantissa
    correctly and carries into the exponent when it must; finite inputs below the overflow bound
    cannot carry into the sign bit, and NaN/inf never get here.
    """
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = np.right_shift(u, 16)
    np.bitwise_and(r, 1, out=r)
    np.add(r, 0x7FFF, out=r)
    np.add(r, u, out=r)
    np.right_shift(r, 16, out=r)
    return r.astype("<u2")


def _from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    u = bits.astype(np.uint32)
    np.left_shift(u, 16, out=u)
    return u.view(np.float32)


@dataclass(frozen=True)
class _Half(_Parameterless):
    """A 16-bit float stage: 2 bytes per element; subclasses give the bit conversions and the
    smallest magnitude that would overflow to inf."""

    overflow: ClassVar[float]

    @staticmethod
    def to_bits(x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def from_bits(bits: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def encoded_size(self, shape: Shape) -> int:
        return 2 * element_count(shape)

    def encode(self, x: np.ndarray, rng: np.random.Generator | None = None) -> Buffer:
        _check_range(self.name, x, self.overflow)
        return _le_bytes(self.to_bits(x))

    def decode(self, data: Buffer, shape: Shape) -> np.ndarray:
        n = _check_size(self.name, data, shape, 2)
        # np.frombuffer only, never allow_pickle.
        bits = np.frombuffer(data, dtype="<u2", count=n)
        return _check_decoded(self.name, self.from_bits(bits).reshape(shape))

    def roundtrip(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        _check_range(self.name, x, self.overflow)
        return self.from_bits(self.to_bits(x)).reshape(x.shape)


@register
@dataclass(frozen=True)
class Fp16(_Half):
    """IEEE half precision (round to nearest even, numpy's cast)."""

    name: ClassVar[str] = "fp16"
    stage_id: ClassVar[int] = 2
    overflow: ClassVar[float] = _FP16_OVERFLOW
    to_bits = staticmethod(_to_fp16_bits)
    from_bits = staticmethod(_from_fp16_bits)


@register
@dataclass(frozen=True)
class Bf16(_Half):
    """bfloat16: the top 16 bits of float32, rounded to nearest even (fp32's range, 8-bit
    mantissa)."""

    name: ClassVar[str] = "bf16"
    stage_id: ClassVar[int] = 3
    overflow: ClassVar[float] = _BF16_OVERFLOW
    to_bits = staticmethod(_to_bf16_bits)
    from_bits = staticmethod(_from_bf16_bits)
