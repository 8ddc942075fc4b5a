"""Torch tensors <-> frames, with the bookkeeping the engine reports (bytes, SNR, timings)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from edgesplit.codecs import Codec, parse_codec
from edgesplit.codecs.entropy import EntropyModel, ModelTable, code_counts, use_models
from edgesplit.codecs.fixed import FixedRange
from edgesplit.wire import labels as wire_labels
from edgesplit.wire.frame import (
    DEFAULT_LIMITS,
    FrameLimits,
    decode_frame,
    encode_frame,
)


@dataclass
class CodecStats:
    """Time spent in one codec and the distortion it caused, accumulated over a run."""

    encode_seconds: float = 0.0
    decode_seconds: float = 0.0
    signal_power: float = 0.0
    noise_power: float = 0.0
    frames: int = 0

    @property
    def snr_db(self) -> float:
        """10·log10(Σa² / Σ(a-â)²) over everything encoded; inf when lossless."""
        if self.noise_power == 0.0:
            return math.inf
        if self.signal_power == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal_power / self.noise_power)


@dataclass
class TensorCodec:
    """A codec bound to one direction of one tensor stream."""

    codec: Codec
    stats: CodecStats = field(default_factory=CodecStats)
    measure_snr: bool = True
    limits: FrameLimits = DEFAULT_LIMITS  # what a decoded frame may claim and allocate
    #: The entropy models this stream encodes with (its own: never another party's).
    models: ModelTable = field(default_factory=ModelTable)
    #: Per-channel code counts since the last :meth:`refit` (``fq:B,ans`` codecs only).
    counts: np.ndarray | None = None

    @classmethod
    def from_spec(
        cls, spec: str | Codec, *, measure_snr: bool = True, limits: FrameLimits = DEFAULT_LIMITS
    ) -> TensorCodec:
        """A codec for ``spec``. Stochastic rounding draws from a generator seeded from torch's
        global generator, so a run seeded with ``torch.manual_seed`` is reproducible (an
        unseeded one made two runs of the same seed differ by up to 1.6 points on digits)."""
        codec = parse_codec(spec) if isinstance(spec, str) else spec
        if codec.stochastic:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
            codec = Codec(codec.stages, rng=np.random.default_rng(seed))
        return cls(codec, measure_snr=measure_snr, limits=limits)

    def encode(self, tensor: torch.Tensor, *, fit: bool = False) -> bytes:
        """The frame of ``tensor``; with ``fit``, its codes also count towards the next
        entropy model (training batches only: the model describes the training distribution)."""
        array = tensor.detach().cpu().numpy()
        start = time.perf_counter()
        with use_models(self.models):
            frame = encode_frame(array, self.codec)
        self.stats.encode_seconds += time.perf_counter() - start
        value = self.codec.value
        if fit and isinstance(value, FixedRange) and value.ans and array.ndim >= 2:
            counts = code_counts(value.codes(array), 1 << value.bits)
            self.counts = counts if self.counts is None else self.counts + counts
        self.stats.frames += 1
        if self.measure_snr:
            # decode a private copy for the distortion figure; its time is not counted as decode
            with use_models(self.models):
                decoded = decode_frame(frame)
            diff = decoded.astype(np.float64) - array.astype(np.float64)
            self.stats.signal_power += float(np.square(array, dtype=np.float64).sum())
            self.stats.noise_power += float(np.square(diff).sum())
        return frame

    def refit(self) -> EntropyModel | None:
        """Fit an entropy model on the codes counted since the last refit and encode with it
        from now on; ``None`` when this codec learns no model, nothing was counted, or the new
        model would not pay for itself: sending it costs its frame, and it is kept only if it
        codes the counted codes (the next epoch's, presumably alike) in fewer bytes than that
        less than the current model does."""
        value = self.codec.value
        if self.counts is None or not (isinstance(value, FixedRange) and value.ans):
            return None
        counts, self.counts = self.counts, None
        model = EntropyModel.fit(counts)
        current = self.models.get(value.model_id) if value.model_id else None
        if current is not None and current.freqs.shape == model.freqs.shape:
            saved_bytes = (current.coded_bits(counts) - model.coded_bits(counts)) / 8
            if saved_bytes <= len(encode_frame(model.freqs, "fp32")):
                return None
        self.models.add(model)
        self.codec = Codec((value.with_model(model.model_id),), rng=self.codec.rng)
        return model

    def decode(self, frame: bytes) -> torch.Tensor:
        start = time.perf_counter()
        array = decode_frame(frame, self.limits)
        self.stats.decode_seconds += time.perf_counter() - start
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def encode_labels(labels: torch.Tensor | np.ndarray, num_classes: int) -> bytes:
    """Labels as a frame (:func:`edgesplit.wire.labels.encode_labels`), from torch or numpy."""
    array = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return wire_labels.encode_labels(array, num_classes)


def decode_labels(frame: bytes, limits: FrameLimits = DEFAULT_LIMITS) -> torch.Tensor:
    array = decode_frame(frame, limits)
    if array.dtype.kind not in "iu":
        from edgesplit.errors import FrameError

        raise FrameError(f"labels frame holds {array.dtype} values; expected integer class ids")
    return torch.from_numpy(array.astype(np.int64))
