"""The tensor frame: one encoded tensor as self-describing, checksummed bytes.

Layout (little-endian, version 1)::

    magic "ESF" | version u8 | dtype u8 | ndim u8 | nstages u8 | shape: ndim x u32
    stage table: nstages x (stage id u8, param length u16, params)
    payload length u32 | payload | crc32 u32 (zlib.crc32 over everything before it)

* Float tensors (float16/32/64) go through the codec chain named by the stage table; the dtype byte
  records the *source* dtype, and they always decode to **float32**.
* Integer and bool tensors (labels, class ids) are written raw: empty stage table, payload = the
  little-endian bytes. The codec passed to :func:`encode_frame` is ignored for them (labels are
  small and must be exact; a stage table would only cost bytes). They decode to their own dtype.

The decoder trusts nothing (see :func:`decode_frame`): every failure is a
:class:`~edgesplit.errors.FrameError` (framing) or :class:`~edgesplit.errors.CodecError` (stage
table or payload) whose message names the field. numpy only: this module runs on edge devices.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from edgesplit.codecs import Codec, as_codec, stage_by_id
from edgesplit.codecs.base import Buffer, element_count
from edgesplit.errors import FrameError

MAGIC = b"ESF"
VERSION = 1
MAX_NDIM = 8
_FIXED = struct.Struct("<3sBBBB")  # magic, version, dtype, ndim, nstages
_STAGE = struct.Struct("<BH")  # stage id, param length
_U32 = struct.Struct("<I")
_U32_MAX = 0xFFFFFFFF

#: The dtype allow-list: wire code -> numpy dtype. Codes are stable; never reuse one.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.float32),
    2: np.dtype(np.float16),
    3: np.dtype(np.float64),
    16: np.dtype(np.bool_),
    17: np.dtype(np.int8),
    18: np.dtype(np.uint8),
    19: np.dtype(np.int16),
    20: np.dtype(np.uint16),
    21: np.dtype(np.int32),
    22: np.dtype(np.uint32),
    23: np.dtype(np.int64),
    24: np.dtype(np.uint64),
}
# Keyed by (kind, itemsize) so byte order does not matter ('>i8' and '<i8' are both int64).
_CODE_OF: dict[tuple[str, int], int] = {(d.kind, d.itemsize): c for c, d in DTYPE_CODES.items()}


def _allowed() -> str:
    return ", ".join(f"{c}={d}" for c, d in DTYPE_CODES.items())


@dataclass(frozen=True)
class FrameLimits:
    """What a receiver is willing to allocate for one frame.

    Attributes
    ----------
    max_elements:
        Largest element count a frame's shape may claim (default 2**27, 128 Mi elements).
    max_decoded_bytes:
        Largest decoded tensor, and largest intermediate buffer a byte stage may inflate to
        (default 2**29, 512 MiB).
    """

    max_elements: int = 1 << 27
    max_decoded_bytes: int = 1 << 29

    def __post_init__(self) -> None:
        for name in ("max_elements", "max_decoded_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise FrameError(f"FrameLimits.{name} must be a non-negative int, got {value!r}")


DEFAULT_LIMITS = FrameLimits()


@dataclass(frozen=True)
class StageInfo:
    """One entry of a frame's stage table."""

    stage_id: int
    name: str
    params: bytes
    spec: str


@dataclass(frozen=True)
class FrameHeader:
    """Everything before the payload, validated.

    Attributes
    ----------
    version, dtype, shape:
        From the fixed header; ``dtype`` is the source dtype.
    stages:
        The stage table (empty for raw integer/bool frames).
    payload_length:
        Payload bytes.
    header_length:
        Offset of the payload in the frame.
    """

    version: int
    dtype: np.dtype
    shape: tuple[int, ...]
    stages: tuple[StageInfo, ...]
    payload_length: int
    header_length: int

    @property
    def codec(self) -> str:
        """Canonical codec spec of the stage table (``""`` for a raw frame)."""
        return "+".join(s.spec for s in self.stages)

    @property
    def n_elements(self) -> int:
        return element_count(self.shape)

    @property
    def frame_length(self) -> int:
        return self.header_length + self.payload_length + _U32.size


def encode_frame(
    x: np.ndarray, codec: Codec | str, *, rng: np.random.Generator | None = None
) -> bytes:
    """Encode one tensor as a frame.

    Parameters
    ----------
    x:
        float16/32/64 tensor (through ``codec``), or integer/bool tensor (raw; ``codec`` ignored).
    codec:
        A :class:`~edgesplit.codecs.Codec` or a spec string such as ``"q8+zstd"``.
    rng:
        Generator for stochastic rounding (defaults to the codec's own).

    Returns
    -------
    bytes
        The frame.

    Raises
    ------
    FrameError
        Unsupported dtype, ndim > 8, a dimension or payload over 2**32 - 1.
    CodecError
        A bad spec, or a tensor the codec refuses (NaN/inf, out of range).
    """
    x = np.asarray(x)
    code = _CODE_OF.get((x.dtype.kind, x.dtype.itemsize))
    if code is None:
        raise FrameError(f"frame dtype {x.dtype} is not allowed; allowed: {_allowed()}")
    if x.ndim > MAX_NDIM:
        raise FrameError(f"frame ndim {x.ndim} exceeds the maximum {MAX_NDIM}")
    if any(d > _U32_MAX for d in x.shape):
        raise FrameError(f"frame shape {x.shape} has a dimension over {_U32_MAX}")
    table, payload = as_codec(codec).encode_buffer(x, rng=rng)
    if len(payload) > _U32_MAX:
        raise FrameError(f"frame payload of {len(payload)} bytes exceeds the u32 length field")
    parts = [_FIXED.pack(MAGIC, VERSION, code, x.ndim, len(table))]
    parts.append(struct.pack(f"<{x.ndim}I", *x.shape))
    for sid, params in table:
        parts.append(_STAGE.pack(sid, len(params)))
        parts.append(params)
    parts.append(_U32.pack(len(payload)))
    head = b"".join(parts)
    # crc over head then payload without first concatenating them (saves a copy of the payload)
    crc = zlib.crc32(payload, zlib.crc32(head))
    return b"".join([head, payload, _U32.pack(crc)])


def _need(mv: memoryview, pos: int, size: int, what: str) -> None:
    if len(mv) < pos + size:
        raise FrameError(
            f"frame is truncated in its {what}: it needs bytes up to offset {pos + size}, "
            f"the frame has {len(mv)}"
        )


def _parse(data: Buffer, limits: FrameLimits) -> tuple[FrameHeader, Codec | None, memoryview]:
    """Validate everything but the payload's contents; cheap checks before any allocation."""
    try:
        mv = memoryview(data).cast("B")
    except TypeError:
        raise FrameError(f"a frame must be bytes, got {type(data).__name__}") from None
    _need(mv, 0, _FIXED.size, "fixed header")
    magic, version, dcode, ndim, nstages = _FIXED.unpack_from(mv, 0)
    if magic != MAGIC:
        raise FrameError(f"frame magic is {bytes(magic)!r}, expected {MAGIC!r} (not an ESF frame)")
    if version != VERSION:
        raise FrameError(f"frame version {version} is not supported (this reader knows {VERSION})")
    dtype = DTYPE_CODES.get(dcode)
    if dtype is None:
        raise FrameError(f"frame dtype code {dcode} is not allowed; allowed: {_allowed()}")
    if ndim > MAX_NDIM:
        raise FrameError(f"frame ndim {ndim} exceeds the maximum {MAX_NDIM}")
    pos = _FIXED.size
    _need(mv, pos, 4 * ndim, "shape")
    shape = struct.unpack_from(f"<{ndim}I", mv, pos)
    pos += 4 * ndim
    # Python ints cannot overflow, so the product is exact however large the dims claim to be;
    # it is checked against the limits before anything is allocated.
    n = element_count(shape)
    if n > limits.max_elements:
        raise FrameError(
            f"frame shape {shape} has {n} elements, over the limit of {limits.max_elements}"
        )
    # An empty tensor passes the count check whatever its other dims say, but numpy still
    # multiplies them (and fails past 2**63): hold the non-zero dims to the same limit.
    span = element_count(d for d in shape if d)
    if span > limits.max_elements:
        raise FrameError(
            f"frame shape {shape}: its non-zero dims multiply to {span}, over the limit of "
            f"{limits.max_elements} (even for an empty tensor)"
        )
    raw = dtype.kind != "f"
    out_bytes = n * (dtype.itemsize if raw else 4)
    if out_bytes > limits.max_decoded_bytes:
        raise FrameError(
            f"frame shape {shape} would decode to {out_bytes} bytes, over the limit of "
            f"{limits.max_decoded_bytes}"
        )
    table: list[tuple[int, bytes]] = []
    for i in range(nstages):
        _need(mv, pos, _STAGE.size, f"stage table entry {i}")
        sid, plen = _STAGE.unpack_from(mv, pos)
        pos += _STAGE.size
        _need(mv, pos, plen, f"stage {i} params")
        table.append((sid, bytes(mv[pos : pos + plen])))
        pos += plen
    _need(mv, pos, _U32.size, "payload length")
    (payload_length,) = _U32.unpack_from(mv, pos)
    pos += _U32.size
    present = len(mv) - pos - _U32.size
    if present < 0:
        raise FrameError(f"frame is truncated: no room for the 4-byte crc after offset {pos}")
    if payload_length != present:
        raise FrameError(
            f"frame payload length {payload_length} does not match the {present} bytes present "
            "(between the header and the crc)"
        )
    (stored,) = _U32.unpack_from(mv, len(mv) - _U32.size)
    computed = zlib.crc32(mv[: len(mv) - _U32.size])
    if stored != computed:
        raise FrameError(
            f"frame crc32 0x{stored:08x} does not match the computed 0x{computed:08x} "
            "(corrupted or truncated frame)"
        )
    # Semantics of the stage table: ids, params and order (CodecError names the stage).
    codec: Codec | None = None
    if raw:
        if table:
            raise FrameError(
                f"frame dtype {dtype} travels raw, so its stage table must be empty; it has "
                f"{len(table)} stages"
            )
    else:
        if not table:
            raise FrameError(f"frame dtype {dtype} needs a stage table naming its value stage")
        codec = Codec.from_stage_table(table)
        inner = codec.inner_size(shape)
        if inner > limits.max_decoded_bytes:
            raise FrameError(
                f"frame codec {codec.spec!r} would inflate shape {shape} to {inner} bytes, over "
                f"the limit of {limits.max_decoded_bytes}"
            )
    stages = tuple(
        StageInfo(sid, stage_by_id(sid).name, params, s.spec())
        for (sid, params), s in zip(table, codec.stages if codec else (), strict=True)
    )
    header = FrameHeader(VERSION, dtype, shape, stages, payload_length, pos)
    return header, codec, mv[pos : pos + payload_length]


def read_header(data: Buffer, limits: FrameLimits = DEFAULT_LIMITS) -> FrameHeader:
    """Parse and validate a frame's header, lengths, crc and stage table without decoding.

    Raises
    ------
    FrameError, CodecError
        Exactly as :func:`decode_frame` would for everything but the payload's contents.
    """
    return _parse(data, limits)[0]


def decode_frame(data: Buffer, limits: FrameLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode a frame to a tensor, trusting nothing in it.

    Checks, in order: magic, version, allow-listed dtype, ``ndim <= 8``, element count and decoded
    size under ``limits`` (before any allocation), each stage-table entry and the payload length
    against the bytes present (truncated or trailing bytes are refused), the crc32, the stage ids,
    params and order, the size the chain would inflate to; then the payload: a zstd frame must
    declare a content size equal to what the header implies, every stage checks its exact size.
    Nothing is unpickled (``np.frombuffer`` only).

    Parameters
    ----------
    data:
        The frame bytes.
    limits:
        The receiver's allocation limits.

    Returns
    -------
    numpy.ndarray
        A writable array: float32 for float frames, the frame's dtype for integer/bool frames.

    Raises
    ------
    FrameError
        Framing problems (magic, version, dtype, ndim, limits, lengths, crc).
    CodecError
        Stage-table or payload problems.
    """
    header, codec, payload = _parse(data, limits)
    if codec is None:
        return Codec.decode([], payload, header.shape, header.dtype)
    return codec.decode_payload(payload, header.shape, max_inner_bytes=limits.max_decoded_bytes)


@lru_cache(maxsize=256)
def fp32_frame_size(shape: tuple[int, ...]) -> int:
    """Length of the fp32 frame of a float tensor of ``shape``: the baseline every ratio uses."""
    return len(encode_frame(np.zeros(shape, dtype=np.float32), "fp32"))
