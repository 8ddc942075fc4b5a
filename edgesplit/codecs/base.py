"""Codec stages: the three kinds of stage, and the table that gives each one a stable id.

A codec is a chain of stages (see :mod:`edgesplit.codecs.registry`):

* a **sparse** stage (``topk``) picks which elements travel and writes their positions;
* a **value** stage (``fp32``, ``fp16``, ``bf16``, ``q8`` … ``q1``) turns float32 values into bytes;
* **byte** stages (``zstd``) losslessly transform those bytes.

Every stage class carries a ``name`` (what a spec says) and a ``stage_id`` (what a frame says).
Ids are written by hand on each class — never derived from import or dict order — and the table
refuses a second stage with the same name or id, so an id once shipped keeps its meaning.

numpy + zstandard only: this package runs on the edge device.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar, TypeVar

import numpy as np

from edgesplit.errors import CodecError

#: Anything with the buffer protocol that stages pass between each other (no copies needed).
Buffer = bytes | bytearray | memoryview

#: Shapes are plain tuples of non-negative ints.
Shape = tuple[int, ...]


class StageKind(enum.IntEnum):
    """Where a stage sits in a chain; a chain's stages appear in increasing kind order."""

    SPARSE = 0
    VALUE = 1
    BYTES = 2


def element_count(shape: Iterable[int]) -> int:
    """Number of elements of ``shape`` (Python ints: no overflow, whatever the frame claims)."""
    n = 1
    for d in shape:
        n *= int(d)
    return n


def check_shape(shape: Sequence[int]) -> Shape:
    """``shape`` as a tuple of ints that numpy can address (non-negative, product of the non-zero
    dims below 2**62) — so building an array of it raises nothing but a CodecError."""
    out = tuple(int(d) for d in shape)
    if any(d < 0 for d in out):
        raise CodecError(f"shape {out} has a negative dimension")
    if element_count(d for d in out if d) >= 1 << 62:
        raise CodecError(f"shape {out} is too large to address")
    return out


def min_max(x: np.ndarray) -> tuple[float, float]:
    """(min, max) of a non-empty float32 array as Python floats; NaN propagates through both."""
    return float(x.min()), float(x.max())


def check_finite(name: str, lo: float, hi: float, x: np.ndarray) -> None:
    """Refuse NaN/inf input, naming how many of each there are.

    ``lo``/``hi`` are the array's min/max (already computed by the caller): NaN propagates through
    ``min``/``max`` and an inf is its own min or max, so both finite means every element is.
    Counting only happens on the error path.
    """
    if np.isfinite(lo) and np.isfinite(hi):
        return
    n_nan = int(np.isnan(x).sum())
    n_inf = int(np.isinf(x).sum())
    raise CodecError(
        f"{name} cannot encode a tensor with {n_nan} NaN and {n_inf} inf values: "
        "codecs carry finite tensors only (check the model for divergence)"
    )


def parse_flags(name: str, args: Sequence[str], known: Sequence[str]) -> set[str]:
    """Spec flags such as ``channel,stochastic``: each known, none repeated."""
    flags: set[str] = set()
    for arg in args:
        if arg not in known:
            raise CodecError(f"{name} has no option {arg!r}; valid options: {', '.join(known)}")
        if arg in flags:
            raise CodecError(f"{name} option {arg!r} is given twice")
        flags.add(arg)
    return flags


class Stage(ABC):
    """One stage of a codec chain. Subclasses are frozen dataclasses registered with
    :func:`register`; an instance is one configuration of the stage (e.g. ``q4:channel``)."""

    name: ClassVar[str]
    stage_id: ClassVar[int]
    kind: ClassVar[StageKind]

    @classmethod
    @abstractmethod
    def from_args(cls, args: Sequence[str]) -> Stage:
        """Build from the spec parameters after ``name:`` (``[]`` when there are none)."""

    @classmethod
    @abstractmethod
    def from_params(cls, params: bytes) -> Stage:
        """Build from the params bytes of a frame's stage table, validating every field."""

    @abstractmethod
    def params(self) -> bytes:
        """The params bytes written in the frame's stage table."""

    @abstractmethod
    def spec(self) -> str:
        """Canonical spec text of this stage (``from_args`` of its parameters gives it back)."""

    @classmethod
    def _no_args(cls, args: Sequence[str]) -> None:
        if args:
            raise CodecError(f"{cls.name} takes no parameters, got {':'.join(args)!r}")

    @classmethod
    def _no_params(cls, params: bytes) -> None:
        if params:
            raise CodecError(
                f"{cls.name} stage params must be empty, the frame has {len(params)} bytes"
            )


class ValueStage(Stage):
    """Turns a float32 tensor into bytes whose length depends only on the shape."""

    kind: ClassVar[StageKind] = StageKind.VALUE

    @property
    def needs_shape(self) -> bool:
        """True when the stage needs the tensor's real shape (per-channel scales); such a stage
        cannot follow a sparse stage, whose values are a flat vector."""
        return False

    @property
    def variable_size(self) -> bool:
        """True when the payload length depends on the data (entropy coding): then
        :meth:`encoded_size` is an upper bound and the stage must be alone in its codec."""
        return False

    @abstractmethod
    def encoded_size(self, shape: Shape) -> int:
        """Exact payload bytes for a tensor of ``shape`` (what the decoder checks against);
        an upper bound for a :attr:`variable_size` stage."""

    @abstractmethod
    def encode(self, x: np.ndarray, rng: np.random.Generator | None = None) -> Buffer:
        """Encode a C-contiguous float32 array (the stage itself refuses NaN/inf)."""

    @abstractmethod
    def decode(self, data: Buffer, shape: Shape) -> np.ndarray:
        """Decode exactly ``encoded_size(shape)`` bytes to a writable float32 array."""

    def roundtrip(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """``decode(encode(x))``; stages may override with something cheaper but identical."""
        return self.decode(self.encode(x, rng), x.shape)


class SparseStage(Stage):
    """Chooses which elements travel: a flat vector of kept values plus an index section."""

    kind: ClassVar[StageKind] = StageKind.SPARSE

    @abstractmethod
    def kept(self, n: int) -> int:
        """How many of ``n`` elements are kept (a function of ``n`` and the params only)."""

    @abstractmethod
    def index_size(self, n: int) -> int:
        """Exact bytes of the index section for ``n`` elements."""

    @abstractmethod
    def select(self, x: np.ndarray) -> tuple[Buffer, np.ndarray]:
        """Flat float32 ``x`` -> (index section, kept values as a flat float32 array)."""

    @abstractmethod
    def scatter(self, index: Buffer, values: np.ndarray, n: int) -> np.ndarray:
        """Inverse of :meth:`select`: a flat float32 array of ``n`` elements, zeros elsewhere."""


class ByteStage(Stage):
    """A lossless bytes -> bytes transform."""

    kind: ClassVar[StageKind] = StageKind.BYTES

    @abstractmethod
    def encode(self, data: Buffer) -> Buffer:
        """Transform the bytes."""

    @abstractmethod
    def decode(self, data: Buffer, expected_size: int) -> Buffer:
        """Inverse transform; must produce exactly ``expected_size`` bytes or raise."""


S = TypeVar("S", bound=type[Stage])


class StageRegistry:
    """Name -> stage class and id -> stage class, both refusing duplicates."""

    def __init__(self) -> None:
        self.by_name: dict[str, type[Stage]] = {}
        self.by_id: dict[int, type[Stage]] = {}

    def register(self, cls: S) -> S:
        """Class decorator adding ``cls`` under its ``name`` and ``stage_id``."""
        name = getattr(cls, "name", None)
        sid = getattr(cls, "stage_id", None)
        if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
            raise CodecError(f"stage class {cls.__name__} needs a lowercase name, got {name!r}")
        # u8 on the wire; 0 stays reserved so an all-zero table entry is never valid.
        if not isinstance(sid, int) or not 1 <= sid <= 255:
            raise CodecError(f"stage {name!r} needs an explicit stage_id in 1..255, got {sid!r}")
        if name in self.by_name:
            raise CodecError(
                f"stage name {name!r} is already registered by {self.by_name[name].__name__}"
            )
        if sid in self.by_id:
            raise CodecError(
                f"stage id {sid} of {name!r} is already taken by {self.by_id[sid].name!r}"
            )
        self.by_name[name] = cls
        self.by_id[sid] = cls
        return cls

    def names(self) -> list[str]:
        return sorted(self.by_name)


#: The process-wide table the built-in stages register into.
REGISTRY = StageRegistry()

register: Callable[[S], S] = REGISTRY.register
