"""Fixed-range quantizer ``fq:BITS`` — the bitstream half of a learned bottleneck.

The bottleneck's bounded activation puts every value in [0, 1], so the quantization levels are
fixed by the model: ``L = 2**bits - 1`` steps, code ``c = floor(clip(x, 0, 1) * L + 0.5)``
(float32 arithmetic), decoded as ``c / L``. Nothing is sent per batch: no ``lo``, no scale.
The torch half (:class:`edgesplit.split.bottleneck.FixedRangeQuantizer`) performs the same float32
operations, so training sees exactly the levels the device sends (a test pins this).

Spec and params:

* ``fq:2`` — codes bit-packed, ``ceil(n * bits / 8)`` payload bytes (first element in the low bits).
* ``fq:2,ans`` — entropy-coded once a model exists (the training engine fits one per epoch);
  until then it packs. ``fq:2,model=1a2b3c4d`` names the model: a frame's payload is then an rANS
  stream coded with that per-channel model (:mod:`edgesplit.codecs.entropy`).
* frame params: ``bits u8 | model id u32`` (0 = packed).

An entropy-coded payload has no fixed length, so ``fq`` with a model is the only stage of its
codec (no sparse stage before it, no byte stage after it: zstd cannot shrink an ANS stream).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from edgesplit.codecs import entropy
from edgesplit.codecs.base import Buffer, Shape, ValueStage, element_count, register
from edgesplit.codecs.quant import _pack, _unpack
from edgesplit.errors import CodecError

_PARAMS = struct.Struct("<BI")


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Bit-pack uint8 ``codes`` (each < 2**bits) at ``bits`` bits each, low bits first."""
    flat = codes.reshape(-1)
    if bits in (1, 2, 4, 8):
        per = 8 // bits
        padded = np.zeros(-(-flat.size // per) * per, dtype=np.uint8)
        padded[: flat.size] = flat
        out = np.empty(padded.size // per, dtype=np.uint8)
        _pack(padded, bits, out)
        return out.tobytes()
    planes = np.unpackbits(flat[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_codes(data: Buffer, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``n`` uint8 codes; non-zero padding is a CodecError."""
    raw = np.frombuffer(data, dtype=np.uint8)
    want = (n * bits + 7) // 8
    if raw.size != want:
        raise CodecError(f"{bits}-bit packed codes take {want} bytes for {n} codes, got {raw.size}")
    if bits in (1, 2, 4, 8):
        return _unpack(raw, bits, n)
    planes = np.unpackbits(raw, bitorder="little")
    if planes[n * bits :].any():
        raise CodecError(f"{bits}-bit packed codes have non-zero padding bits")
    return np.packbits(planes[: n * bits].reshape(n, bits), axis=1, bitorder="little")[:, 0]


def quantize_codes(x: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes of float32 ``x`` on the fixed grid ``k / (2**bits - 1)``, k = 0..2**bits-1."""
    levels = np.float32((1 << bits) - 1)
    scaled = np.clip(x, np.float32(0.0), np.float32(1.0)) * levels
    return np.floor(scaled + np.float32(0.5)).astype(np.uint8)


def dequantize_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """float32 values ``codes / (2**bits - 1)``."""
    return codes.astype(np.float32) / np.float32((1 << bits) - 1)


@register
@dataclass(frozen=True)
class FixedRange(ValueStage):
    """``fq:BITS[,ans|,model=ID]``: fixed levels in [0, 1], packed or entropy-coded."""

    name: ClassVar[str] = "fq"
    stage_id: ClassVar[int] = 12
    bits: int = 2
    ans: bool = False  # entropy-code once a model is fitted
    model_id: int = 0  # the model frames reference (0 = pack)

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise CodecError(f"fq takes 1..8 bits, got {self.bits}")
        if not 0 <= self.model_id <= 0xFFFFFFFF:
            raise CodecError(f"fq model id must be a u32, got {self.model_id}")

    # ---- spec and params --------------------------------------------------------------------
    @classmethod
    def from_args(cls, args: Sequence[str]) -> FixedRange:
        if not args:
            raise CodecError("fq needs a bit width: fq:2 (1..8), optionally fq:2,ans")
        try:
            bits = int(args[0])
        except ValueError:
            raise CodecError(f"fq bit width must be an integer 1..8, got {args[0]!r}") from None
        ans, model_id = False, 0
        for arg in args[1:]:
            if arg == "ans":
                ans = True
            elif arg.startswith("model="):
                try:
                    model_id = int(arg[len("model=") :], 16)
                except ValueError:
                    raise CodecError(f"fq model id must be hex, got {arg!r}") from None
                ans = True
            else:
                raise CodecError(f"fq has no option {arg!r}; valid options: ans, model=HEXID")
        return cls(bits, ans, model_id)

    @classmethod
    def from_params(cls, params: bytes) -> FixedRange:
        if len(params) != _PARAMS.size:
            raise CodecError(
                f"fq stage params must be {_PARAMS.size} bytes (bits u8, model id u32), "
                f"the frame has {len(params)}"
            )
        bits, model_id = _PARAMS.unpack(params)
        return cls(bits, model_id != 0, model_id)

    def params(self) -> bytes:
        return _PARAMS.pack(self.bits, self.model_id)

    def spec(self) -> str:
        if self.model_id:
            return f"fq:{self.bits},model={self.model_id:08x}"
        return f"fq:{self.bits},ans" if self.ans else f"fq:{self.bits}"

    def with_model(self, model_id: int) -> FixedRange:
        """The same stage, entropy-coding with model ``model_id``."""
        return FixedRange(self.bits, True, model_id)

    # ---- sizes ------------------------------------------------------------------------------
    @property
    def variable_size(self) -> bool:
        return self.model_id != 0

    def encoded_size(self, shape: Shape) -> int:
        n = element_count(shape)
        if self.model_id:  # an upper bound: whole 32-bit words, at most 24 bits a code
            return entropy.max_stream_bytes(n)
        return (n * self.bits + 7) // 8

    # ---- the stage API ----------------------------------------------------------------------
    def encode(self, x: np.ndarray, rng: np.random.Generator | None = None) -> Buffer:
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise CodecError(f"{self.spec()} cannot encode NaN or inf values")
        codes = quantize_codes(x, self.bits)
        if self.model_id:
            return entropy.ans_encode(codes, self._model())
        return pack_codes(codes, self.bits)

    def _model(self) -> entropy.EntropyModel:
        model = entropy.lookup(self.model_id)
        if model.bits != self.bits:
            raise CodecError(
                f"entropy model {self.model_id:08x} codes {model.bits}-bit symbols, "
                f"the frame says {self.bits} bits"
            )
        return model

    def decode(self, data: Buffer, shape: Shape) -> np.ndarray:
        n = element_count(shape)
        if self.model_id:
            codes = entropy.ans_decode(data, tuple(shape), self._model())
        else:
            codes = unpack_codes(data, self.bits, n).reshape(shape)
        return dequantize_codes(codes, self.bits).reshape(shape)

    def roundtrip(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        return dequantize_codes(quantize_codes(x, self.bits), self.bits)

    def codes(self, x: np.ndarray) -> np.ndarray:
        """The uint8 codes this stage sends for ``x`` (the engine fits models on them)."""
        return quantize_codes(x, self.bits)


__all__ = ["FixedRange", "dequantize_codes", "pack_codes", "quantize_codes", "unpack_codes"]
