"""The stage registry, codec specs and :class:`Codec` — a chain of stages.

A spec is stages joined by ``+``, each ``name[:param[,param]]``, in this order::

    [topk]  then at most one value stage (fp32 fp16 bf16 q8 q4 q2 q1)  then byte stages (zstd)

A spec without a value stage gets ``fp32`` (``"zstd"`` is ``"fp32+zstd"``), so every float frame
names its value stage. Integer and bool tensors (labels, class ids) bypass the chain: they travel
as raw little-endian bytes with an empty stage table, whatever the codec says.

The stage ids written in frames (stable; never reuse or renumber one):

====  =======  =====================================================
id    name     params in the frame's stage table
====  =======  =====================================================
1     fp32     none
2     fp16     none
3     bf16     none
8     q8       u8 flags: 0x01 channel, 0x02 stochastic
9     q4       u8 flags
10    q2       u8 flags
11    q1       u8 flags
12    fq       u8 bits (1..8), u32 entropy model id (0 = bit-packed)
16    topk     f64 kept fraction in (0, 1]
32    zstd     u8 level in 1..22
====  =======  =====================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

# Importing the stage modules registers the built-in stages (decorators run at import).
from edgesplit.codecs import fixed, fp, quant, topk, zstd_stage  # noqa: F401
from edgesplit.codecs.base import (
    REGISTRY,
    Buffer,
    ByteStage,
    Shape,
    SparseStage,
    Stage,
    StageKind,
    ValueStage,
    check_shape,
    element_count,
)
from edgesplit.errors import CodecError

#: ``[(stage_id, params_bytes), ...]`` as written in a frame.
StageTable = list[tuple[int, bytes]]


def stage_names() -> list[str]:
    """Names of all registered stages, sorted."""
    return REGISTRY.names()


def stage_by_name(name: str) -> type[Stage]:
    """The stage class called ``name``; a :class:`CodecError` listing the valid names if none."""
    try:
        return REGISTRY.by_name[name]
    except KeyError:
        raise CodecError(
            f"unknown codec stage {name!r}; valid stages: {', '.join(stage_names())}"
        ) from None


def stage_by_id(stage_id: int) -> type[Stage]:
    """The stage class with frame id ``stage_id``; a :class:`CodecError` listing the ids if none."""
    try:
        return REGISTRY.by_id[stage_id]
    except KeyError:
        valid = ", ".join(f"{i}={c.name}" for i, c in sorted(REGISTRY.by_id.items()))
        raise CodecError(f"unknown codec stage id {stage_id}; valid ids: {valid}") from None


def _names_of(kind: StageKind) -> str:
    return " ".join(c.name for _, c in sorted(REGISTRY.by_id.items()) if c.kind == kind)


def _order_rule() -> str:
    return (
        f"the order is [{_names_of(StageKind.SPARSE)}] then at most one value stage "
        f"({_names_of(StageKind.VALUE)}) then at most one byte stage ({_names_of(StageKind.BYTES)})"
    )


def _check_chain(stages: Sequence[Stage], text: str) -> None:
    """Enforce the chain grammar; ``text`` is what the user (or frame) said, for the message."""
    if not stages:
        raise CodecError(f"codec {text!r} has no stages; {_order_rule()}")
    seen: set[str] = set()
    for prev, cur in zip([None, *stages[:-1]], stages, strict=True):
        if cur.name in seen:
            raise CodecError(
                f"stage {cur.name!r} appears twice in {text!r}; each stage may appear once"
            )
        seen.add(cur.name)
        if prev is not None and cur.kind < prev.kind:
            raise CodecError(
                f"stage {cur.name!r} cannot follow {prev.name!r} in {text!r}; {_order_rule()}"
            )
    for kind, what in (
        (StageKind.SPARSE, "sparse"),
        (StageKind.VALUE, "value"),
        (StageKind.BYTES, "byte"),
    ):
        names = [s.name for s in stages if s.kind == kind]
        # One byte stage at most: the decoder must know each byte stage's exact output size, and
        # the header implies only the size of the value stage's bytes.
        if len(names) > 1:
            raise CodecError(
                f"codec {text!r} has {len(names)} {what} stages ({', '.join(names)}); "
                f"{_order_rule()}"
            )
    value = [s for s in stages if isinstance(s, ValueStage)]
    if value and value[0].variable_size and len(stages) > 1:
        raise CodecError(
            f"{value[0].spec()!r} is entropy-coded and must be the only stage of {text!r} "
            "(no sparse stage before it, no byte stage after it)"
        )
    if any(isinstance(s, SparseStage) for s in stages) and value and value[0].needs_shape:
        raise CodecError(
            f"{value[0].spec()!r} cannot follow a sparse stage in {text!r}: the kept values are a "
            "flat vector with no channel axis; drop ':channel'"
        )


def _split_stage(part: str, text: str) -> tuple[str, list[str]]:
    part = part.strip()
    if not part:
        raise CodecError(f"codec {text!r} has an empty stage (stray '+')")
    name, colon, rest = part.partition(":")
    args = [a.strip() for a in rest.split(",")] if colon else []
    return name.strip().lower(), args


def parse_codec(
    spec: str, *, seed: int | None = None, rng: np.random.Generator | None = None
) -> Codec:
    """Parse a codec spec such as ``"q4+zstd"`` or ``"topk:0.1+q8:channel+zstd:3"``.

    Parameters
    ----------
    spec:
        Stages joined by ``+``, each ``name[:param[,param]]``.
    seed, rng:
        Randomness for stochastic rounding (``q8:stochastic``): pass ``rng`` or a ``seed`` for
        reproducible frames; otherwise a fresh OS-seeded generator is used.

    Returns
    -------
    Codec
        The chain, with ``fp32`` inserted when the spec names no value stage.

    Raises
    ------
    CodecError
        On an unknown stage (listing the valid ones), bad parameters, or a bad order.
    """
    if not isinstance(spec, str):
        raise CodecError(f"a codec spec must be a string like 'q8+zstd', got {spec!r}")
    text = spec.strip()
    if not text:
        raise CodecError(f"empty codec spec; valid stages: {', '.join(stage_names())}")
    stages: list[Stage] = []
    for part in text.split("+"):
        name, args = _split_stage(part, text)
        stages.append(stage_by_name(name).from_args(args))
    _check_chain(stages, text)
    if not any(s.kind == StageKind.VALUE for s in stages):
        at = sum(1 for s in stages if s.kind == StageKind.SPARSE)
        stages.insert(at, fp.Fp32())
    if rng is None and seed is not None:
        rng = np.random.default_rng(seed)
    return Codec(tuple(stages), rng=rng)


def as_codec(codec: Codec | str) -> Codec:
    """``codec`` itself, or the parse of a spec string."""
    return codec if isinstance(codec, Codec) else parse_codec(codec)


def _float32(x: np.ndarray) -> np.ndarray:
    if x.dtype.kind != "f" or x.dtype.itemsize not in (2, 4, 8):
        raise CodecError(
            f"codecs encode float16/float32/float64 tensors (and integer/bool ones raw); "
            f"got dtype {x.dtype}"
        )
    # float64 beyond float32's range becomes inf here and is then refused by the value stage.
    with np.errstate(over="ignore", invalid="ignore"):
        return np.ascontiguousarray(x, dtype=np.float32)


def _raw_bytes(x: np.ndarray) -> memoryview:
    le = np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<"), copy=False)
    return np.ascontiguousarray(le).reshape(-1).view(np.uint8).data


def _is_raw(dtype: np.dtype) -> bool:
    return dtype.kind in "iub"


@lru_cache(maxsize=256)
def _codec_for_table(table: tuple[tuple[int, bytes], ...]) -> Codec:
    # failures raise and are not cached; a peer cycling through tables only evicts entries
    return Codec._build_from_table(table)


@dataclass(frozen=True)
class Codec:
    """A validated chain of stages: the bitstream path (:meth:`encode` / :meth:`decode`) and the
    training-time path (:meth:`roundtrip`) on one object.

    Attributes
    ----------
    stages:
        ``[sparse] value [byte]`` stage instances.
    rng:
        Generator used by stochastic rounding when ``encode``/``roundtrip`` get none. Shared
        state: give each thread its own codec (or pass ``rng=``) if stochastic frames must be
        reproducible.
    """

    stages: tuple[Stage, ...]
    rng: np.random.Generator | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        _check_chain(self.stages, "+".join(s.spec() for s in self.stages))
        if not any(isinstance(s, ValueStage) for s in self.stages):
            raise CodecError(f"codec {self.spec!r} has no value stage")
        if self.rng is None and self.stochastic:
            object.__setattr__(self, "rng", np.random.default_rng())

    # ---- description ------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        """Canonical spec: ``parse_codec(c.spec) == c``."""
        return "+".join(s.spec() for s in self.stages)

    @property
    def sparse(self) -> SparseStage | None:
        return next((s for s in self.stages if isinstance(s, SparseStage)), None)

    @property
    def value(self) -> ValueStage:
        return next(s for s in self.stages if isinstance(s, ValueStage))

    @property
    def byte_stages(self) -> tuple[ByteStage, ...]:
        return tuple(s for s in self.stages if isinstance(s, ByteStage))

    @property
    def stochastic(self) -> bool:
        return any(getattr(s, "stochastic", False) for s in self.stages)

    def stage_table(self) -> StageTable:
        """``[(stage_id, params_bytes), ...]`` as written in a frame."""
        return [(s.stage_id, s.params()) for s in self.stages]

    def inner_size(self, shape: Shape) -> int:
        """Exact bytes the sparse and value stages produce for a tensor of ``shape`` — what a
        byte stage must inflate to. Needs no data, so a decoder can check it before allocating."""
        sparse = self.sparse
        if sparse is None:
            return self.value.encoded_size(tuple(shape))
        n = element_count(shape)
        return sparse.index_size(n) + self.value.encoded_size((sparse.kept(n),))

    @classmethod
    def from_stage_table(cls, table: Sequence[tuple[int, bytes]]) -> Codec:
        """Rebuild the chain a frame describes, validating every id, param and the order.

        Unlike a spec, a frame must name its value stage explicitly. Chains are cached by their
        table: a stream of frames from one codec is validated once, not once per frame.
        """
        return _codec_for_table(tuple((int(sid), bytes(params)) for sid, params in table))

    @classmethod
    def _build_from_table(cls, table: tuple[tuple[int, bytes], ...]) -> Codec:
        stages = [stage_by_id(sid).from_params(params) for sid, params in table]
        _check_chain(stages, "+".join(s.spec() for s in stages))
        if not any(isinstance(s, ValueStage) for s in stages):
            raise CodecError(
                f"frame stage table {'+'.join(s.spec() for s in stages)!r} names no value stage"
            )
        return cls(tuple(stages))

    # ---- bitstream path ---------------------------------------------------------------------
    def encode_buffer(
        self, x: np.ndarray, *, rng: np.random.Generator | None = None
    ) -> tuple[StageTable, Buffer]:
        """Like :meth:`encode` but may return a memoryview (saves a copy for frame building)."""
        x = np.asarray(x)
        if _is_raw(x.dtype):
            return [], _raw_bytes(x)
        x32 = _float32(x)
        rng = rng if rng is not None else self.rng
        sparse = self.sparse
        if sparse is None:
            data: Buffer = self.value.encode(x32, rng)
        else:
            index, values = sparse.select(x32)
            data = b"".join([index, self.value.encode(values, rng)])
        for stage in self.byte_stages:
            data = stage.encode(data)
        return self.stage_table(), data

    def encode(
        self, x: np.ndarray, *, rng: np.random.Generator | None = None
    ) -> tuple[StageTable, bytes]:
        """Encode a tensor.

        Parameters
        ----------
        x:
            float16/32/64 tensor (encoded as float32 through the chain), or an integer/bool
            tensor (raw little-endian bytes, empty stage table).
        rng:
            Generator for stochastic rounding; defaults to the codec's own.

        Returns
        -------
        (stage_table, payload)
            ``[(stage_id, params)]`` and the payload bytes.
        """
        table, data = self.encode_buffer(x, rng=rng)
        return table, bytes(data)

    @staticmethod
    def decode(
        stage_table: Sequence[tuple[int, bytes]],
        payload: Buffer,
        shape: Sequence[int],
        dtype: np.dtype | type | str = np.float32,
        *,
        max_inner_bytes: int | None = None,
    ) -> np.ndarray:
        """Decode a payload with the chain its *own* stage table describes.

        A static method on purpose: the receiver's idea of the codec is never trusted, the frame's
        stage table is (after validation).

        Parameters
        ----------
        stage_table:
            ``[(stage_id, params)]`` from the frame.
        payload:
            The payload bytes.
        shape:
            Tensor shape from the frame.
        dtype:
            Source dtype from the frame: a float dtype decodes to float32 through the chain; an
            integer/bool dtype is raw bytes and needs an empty stage table.
        max_inner_bytes:
            Refuse before inflating when the chain's intermediate bytes would exceed this.

        Returns
        -------
        numpy.ndarray
            A writable, native-byte-order array of ``shape``.
        """
        shape = check_shape(shape)
        dt = np.dtype(dtype)
        data = memoryview(payload).cast("B")
        n = element_count(shape)
        if _is_raw(dt):
            if stage_table:
                raise CodecError(
                    f"{dt} tensors travel raw: the stage table must be empty, it has "
                    f"{len(stage_table)} stages"
                )
            want = n * dt.itemsize
            if len(data) != want:
                raise CodecError(
                    f"raw {dt} payload is {len(data)} bytes; shape {shape} implies {want}"
                )
            if dt.kind == "b" and n and int(np.frombuffer(data, dtype=np.uint8).max()) > 1:
                raise CodecError("bool payload holds bytes other than 0 and 1")
            # np.frombuffer only, never allow_pickle; astype copies to a writable native array.
            raw = np.frombuffer(data, dtype=dt.newbyteorder("<"), count=n)
            return raw.astype(dt.newbyteorder("=")).reshape(shape)
        if dt.kind != "f":
            raise CodecError(f"cannot decode dtype {dt}: float, integer or bool only")
        codec = Codec.from_stage_table(stage_table)
        return codec.decode_payload(data, shape, max_inner_bytes=max_inner_bytes)

    def decode_payload(
        self, payload: Buffer, shape: Sequence[int], *, max_inner_bytes: int | None = None
    ) -> np.ndarray:
        """Decode a float payload with this (already validated) chain; see :meth:`decode`,
        which is what a receiver should call."""
        shape = check_shape(shape)
        data = memoryview(payload).cast("B")
        inner = self.inner_size(shape)
        if max_inner_bytes is not None and inner > max_inner_bytes:
            raise CodecError(
                f"codec {self.spec!r} would inflate shape {shape} to {inner} bytes, over the "
                f"limit of {max_inner_bytes}"
            )
        buf: Buffer = data
        for stage in reversed(self.byte_stages):
            buf = stage.decode(buf, inner)
        buf = memoryview(buf).cast("B")
        sparse = self.sparse
        if sparse is None:
            return self.value.decode(buf, shape)
        if len(buf) != inner:
            raise CodecError(
                f"codec {self.spec!r} payload is {len(buf)} bytes; shape {shape} implies {inner}"
            )
        n = element_count(shape)
        isz = sparse.index_size(n)
        values = self.value.decode(buf[isz:], (sparse.kept(n),))
        return sparse.scatter(buf[:isz], values, n).reshape(shape)

    # ---- training-time path -----------------------------------------------------------------
    def roundtrip(self, x: np.ndarray, *, rng: np.random.Generator | None = None) -> np.ndarray:
        """``decode(encode(x))`` without the bytes: what the receiver would see.

        Byte stages are lossless, so they are skipped; the result equals the bitstream path's
        exactly (same codes, same rng draws). Float input gives float32, integer input a copy.
        """
        x = np.asarray(x)
        if _is_raw(x.dtype):
            return x.copy()
        x32 = _float32(x)
        rng = rng if rng is not None else self.rng
        sparse = self.sparse
        if sparse is None:
            return self.value.roundtrip(x32, rng)
        index, values = sparse.select(x32)
        kept = self.value.roundtrip(values, rng)
        return sparse.scatter(index, kept, x32.size).reshape(x32.shape)
