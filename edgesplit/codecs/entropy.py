"""Static entropy models for fixed-range codes, and the rANS coder that uses them.

A model gives each channel (axis 1 of the tensor) its own categorical distribution over the
``2**bits`` codes. It is *side information*: fitted once on training codes, versioned by a
content hash (its id), shipped in the bundle / announced to the server, and referenced from each
frame by that id — never repeated per frame.

Coding is done by `constriction <https://bamler-lab.github.io/constriction/>`_'s ANS coder
(a maintained Rust library with numpy bindings; no torch). Both sides build the coder's
probabilities from the model's integer frequencies with the same float64 arithmetic, so encoder
and decoder always agree.

Which models a receiver knows is a :class:`ModelTable`. Decoding looks a frame's model id up in
the table made current with :func:`use_models` (a server uses one table per client, so a client
can never replace another client's models), then in the process-wide :data:`GLOBAL_MODELS`
(models loaded from a trusted bundle or checkpoint).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from edgesplit.errors import CodecError

#: Frequencies of one model are uint16 and each is at least 1 (no code is impossible).
_FREQ_MAX = 0xFFFF
#: Largest channel count a model may describe (bounds what a peer can make us allocate).
MAX_CHANNELS = 1 << 14


@dataclass(frozen=True)
class EntropyModel:
    """Per-channel code frequencies: ``freqs[c, k]`` for channel ``c`` and code ``k``.

    Attributes
    ----------
    freqs:
        ``(channels, 2**bits)`` uint16, every entry >= 1.
    """

    freqs: np.ndarray

    def __post_init__(self) -> None:
        f = self.freqs
        if not isinstance(f, np.ndarray) or f.ndim != 2:
            raise CodecError("an entropy model is a 2-D (channels, codes) frequency table")
        channels, codes = f.shape
        if not 1 <= channels <= MAX_CHANNELS:
            raise CodecError(f"entropy model has {channels} channels; allowed 1..{MAX_CHANNELS}")
        if codes not in (2, 4, 8, 16, 32, 64, 128, 256):
            raise CodecError(f"entropy model has {codes} codes per channel; expected 2**bits")
        if f.dtype != np.uint16 or int(f.min()) < 1:
            raise CodecError("entropy model frequencies must be uint16, each at least 1")

    @property
    def channels(self) -> int:
        return int(self.freqs.shape[0])

    @property
    def bits(self) -> int:
        return int(self.freqs.shape[1]).bit_length() - 1

    @property
    def model_id(self) -> int:
        """A non-zero u32 content hash: the id frames reference."""
        digest = hashlib.sha256(np.ascontiguousarray(self.freqs, dtype="<u2").tobytes()).digest()
        return int.from_bytes(digest[:4], "little") or 1

    def probabilities(self) -> np.ndarray:
        """``(channels, codes)`` float64 probabilities (what the coder is given)."""
        f = self.freqs.astype(np.float64)
        return f / f.sum(axis=1, keepdims=True)

    def bits_per_element(self) -> float:
        """Cross-entropy of the model with itself: the expected coded bits per element."""
        p = self.probabilities()
        return float(-(p * np.log2(p)).sum(axis=1).mean())

    def coded_bits(self, counts: np.ndarray) -> float:
        """Bits the coder spends on codes with these per-channel ``counts`` under this model
        (their cross-entropy, which the range coder reaches to within a few bytes a frame)."""
        counts = np.asarray(counts, dtype=np.float64)
        if counts.shape != self.freqs.shape:
            raise CodecError(
                f"code counts of shape {counts.shape} do not fit a model of {self.freqs.shape}"
            )
        return float(-(counts * np.log2(self.probabilities())).sum())

    @classmethod
    def fit(cls, counts: np.ndarray) -> EntropyModel:
        """A model from per-channel code counts (``(channels, codes)``), add-one smoothed so no
        code is impossible, scaled to uint16."""
        counts = np.asarray(counts, dtype=np.float64) + 1.0
        scaled = counts / counts.max(axis=1, keepdims=True) * (_FREQ_MAX - 1)
        return cls(np.maximum(np.rint(scaled), 1).astype(np.uint16))


def code_counts(codes: np.ndarray, levels: int) -> np.ndarray:
    """``(channels, levels)`` counts of uint8 ``codes`` shaped like their tensor (axis 1)."""
    channels = codes.shape[1]
    per_channel = np.moveaxis(codes, 1, 0).reshape(channels, -1).astype(np.int64)
    offsets = (np.arange(channels, dtype=np.int64) * levels)[:, None]
    flat = np.bincount((per_channel + offsets).ravel(), minlength=channels * levels)
    return flat.reshape(channels, levels)


@dataclass
class ModelTable:
    """Models a receiver knows, by id; the oldest is dropped beyond ``capacity``."""

    capacity: int = 4
    models: OrderedDict[int, EntropyModel] = field(default_factory=OrderedDict)

    def add(self, model: EntropyModel) -> int:
        key = model.model_id
        self.models[key] = model
        self.models.move_to_end(key)
        while len(self.models) > self.capacity:
            self.models.popitem(last=False)
        return key

    def get(self, model_id: int) -> EntropyModel | None:
        return self.models.get(model_id)


#: Trusted models of this process (loaded from a bundle or checkpoint, or fitted here).
GLOBAL_MODELS = ModelTable(capacity=64)
_CURRENT: contextvars.ContextVar[ModelTable | None] = contextvars.ContextVar(
    "edgesplit_entropy_models", default=None
)


@contextlib.contextmanager
def use_models(table: ModelTable | None) -> Iterator[None]:
    """Make ``table`` the first place model ids are looked up (in this thread/task)."""
    token = _CURRENT.set(table)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def lookup(model_id: int) -> EntropyModel:
    """The model with ``model_id``; a :class:`CodecError` when this receiver does not have it."""
    current = _CURRENT.get()
    model = (current.get(model_id) if current is not None else None) or GLOBAL_MODELS.get(
        model_id
    )
    if model is None:
        raise CodecError(
            f"frame references entropy model {model_id:08x}, which this receiver does not have "
            "(load the bundle's or checkpoint's entropy models, or send the model first)"
        )
    return model


def _coder_probabilities(model: EntropyModel, shape: tuple[int, ...]) -> np.ndarray:
    """One probability row per element of a C-ordered tensor of ``shape`` (channel = axis 1)."""
    if len(shape) < 2 or shape[1] != model.channels:
        raise CodecError(
            f"entropy model {model.model_id:08x} has {model.channels} channels; the tensor of "
            f"shape {tuple(shape)} needs axis 1 of that size"
        )
    inner = int(np.prod(shape[2:], dtype=np.int64))
    channel_of = np.repeat(np.arange(model.channels), inner)
    rows = np.tile(channel_of, int(shape[0]))
    return model.probabilities()[rows]


def max_stream_bytes(n: int) -> int:
    """Upper bound of an rANS stream of ``n`` codes: constriction's Categorical model quantizes
    probabilities to 24 bits, so a code costs at most 24 bits; plus the final state words."""
    return 4 * ((n * 24 + 31) // 32 + 2)


def ans_encode(codes: np.ndarray, model: EntropyModel) -> bytes:
    """rANS-code uint8 ``codes`` (the tensor's shape, C order) with ``model``."""
    import constriction

    if int(codes.max(initial=0)) >= 1 << model.bits:
        raise CodecError(f"codes exceed the {model.bits}-bit range of the entropy model")
    probs = _coder_probabilities(model, codes.shape)
    coder = constriction.stream.stack.AnsCoder()
    family = constriction.stream.model.Categorical(perfect=False)
    coder.encode_reverse(codes.reshape(-1).astype(np.int32), family, probs)
    return coder.get_compressed().astype("<u4").tobytes()


def ans_decode(
    data: bytes | bytearray | memoryview, shape: tuple[int, ...], model: EntropyModel
) -> np.ndarray:
    """Inverse of :func:`ans_encode`; a corrupt or truncated stream is a :class:`CodecError`."""
    import constriction

    if len(data) % 4:
        raise CodecError(f"entropy-coded payload is {len(data)} bytes, not whole 32-bit words")
    n = int(np.prod(shape, dtype=np.int64))
    if len(data) > max_stream_bytes(n):
        raise CodecError(f"entropy-coded payload of {len(data)} bytes is too long for {n} codes")
    probs = _coder_probabilities(model, shape)
    words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        family = constriction.stream.model.Categorical(perfect=False)
        codes = coder.decode(family, probs) if n else np.zeros(0, dtype=np.int32)
    except Exception as exc:  # the library's own error types: a bad stream, whatever it says
        raise CodecError(f"entropy-coded payload does not decode: {exc}") from None
    if not coder.is_empty():
        raise CodecError("entropy-coded payload has data left after its codes (corrupt stream)")
    return np.asarray(codes, dtype=np.uint8).reshape(shape)


def models_to_json(models: list[EntropyModel]) -> dict[str, list[list[int]]]:
    """``{hex id: frequency rows}``: how bundles, checkpoints and server state store models."""
    return {f"{m.model_id:08x}": m.freqs.astype(int).tolist() for m in models}


def models_from_json(obj: object) -> list[EntropyModel]:
    """Inverse of :func:`models_to_json`; each model's id must match its content."""
    if obj is None:
        return []
    if not isinstance(obj, dict):
        raise CodecError("entropy_models must map hex model ids to frequency tables")
    models = []
    for key, rows in obj.items():
        try:
            freqs = np.asarray(rows, dtype=np.int64)
        except (TypeError, ValueError):
            raise CodecError(f"entropy model {key!r} is not a table of integers") from None
        if freqs.ndim != 2 or freqs.size == 0 or freqs.min() < 1 or freqs.max() > _FREQ_MAX:
            raise CodecError(f"entropy model {key!r} must be a 2-D table of integers 1..65535")
        model = EntropyModel(freqs.astype(np.uint16))
        if f"{model.model_id:08x}" != key:
            raise CodecError(
                f"entropy model {key!r} does not match its content (id {model.model_id:08x}): "
                "the file was altered"
            )
        models.append(model)
    return models


def register_json(obj: object, table: ModelTable = GLOBAL_MODELS) -> list[int]:
    """Add the models of a trusted file (bundle manifest, checkpoint) to ``table``."""
    return [table.add(m) for m in models_from_json(obj)]
