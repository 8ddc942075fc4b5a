"""Drift screening: does a batch of cut activations look like the ones the server trained on?

A client on the wrong device, with a bug, or a malicious one can send activations far off the
training distribution (inputs ×16 as int64, a shifted sensor); one such client training a
shared server can drive its accuracy to chance. :class:`DriftReference` holds per-channel
statistics of the decoded cut activations of the training data, exactly as the server sees them
(through the client segment and the codec); :func:`check_batch` compares one batch with it;
:class:`DriftGuard` applies a policy: ``flag`` (the step is applied, the reply and the metrics
log say so) or ``refuse`` (a training step is refused before anything is applied; a PREDICT is
answered and flagged).

A channel is axis 1 (a 1-D cut: each feature); statistics are pooled over the batch and any
spatial axes.

The rule (:func:`check_batch`): a value is *out of range* when it lies outside its channel's
training range ``[min, max]`` widened on each side by ``MARGIN × (max − min) + FLOOR ×`` the
mean span of all channels, and *far out* when outside the range widened by ``FAR × (max − min)
+ FLOOR × mean span`` (non-finite values are both). The batch drifted when more than
``MAX_OUT_FRACTION`` of its values are out, or more than ``MAX_FAR_FRACTION`` are far out (a
sparse codec such as ``topk:0.05`` zeroes all but 5% of the values, and zeros are in range: the
few it keeps are then what shows the drift). Why this rule and not a z-score of the batch mean:
the batch mean of a legitimate client that holds only a few classes (non-IID data, the normal
case in federated settings) sits many standard errors away from the training mean, while every
one of its values is still inside the training range. A range test is per value, so it does not
depend on the batch size or the class mix; the margin absorbs what a codec adds (per-batch
quantization steps) and samples slightly beyond the training extremes (the test split); the
floor keeps a channel that never fired in training (a dead ReLU: min = max = 0) from tripping on
one test sample. The mean over channels of the batch mean's shift, in units of each channel's
std, is reported for information only.

Measured (3 epochs, each training batch of 32 and each single sample, the test split likewise):
digits (mlp; fp32, q4+zstd, topk:0.1+q8, vanilla/ushape/splitfed/vertical): training batches
0% out, test batches at most 0.8% (one value of 128, a single sample); inputs ×16 31-54% out,
inputs +2 16-23%, uniform noise images 25-46% (vertical party 1: 3 single
samples of 1347 below the threshold); with topk:0.05+q8, ×16 has 4.7-5% far out (test:
0). breast_cancer: training 0%, test batches of 32 at most 0.5%, but one single test sample of
142 has 14% out (a genuine outlier: it is flagged); ×16 35-48%. digits_images (cnn2d, 16×4×4
cut): training and test 0%, ×16 29-68%; inputs +2 (a third of the data's std) and uniform
noise images stay inside the training range after the convolutions and are not flagged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from edgesplit.errors import ConfigError

log = logging.getLogger(__name__)

#: Each side of a channel's training range is widened by this fraction of its span.
MARGIN = 0.25
#: ... plus this fraction of the mean span over all channels (dead channels have no span).
FLOOR = 0.05
#: A batch with more than this fraction of its values out of range has drifted.
MAX_OUT_FRACTION = 0.05
#: Values this many spans (plus the floor) beyond the training range are far out ...
FAR = 2.0
#: ... and a batch with more than this fraction of far-out values has drifted.
MAX_FAR_FRACTION = 0.01
#: The policies of :class:`DriftGuard` (``off``: no guard at all, i.e. ``drift=None``).
POLICIES = ("flag", "refuse")
#: A flagged client's warning is logged for its first flagged batch and every N-th after.
WARN_EVERY = 100
#: Channels named in a verdict (the most out of range first).
NAMED_CHANNELS = 3


def _channels(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """``x`` (batch, channels, ...) as a float64 matrix (values, channels)."""
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if array.ndim < 2:
        raise ValueError(f"cut activations need a batch and a channel axis, got {array.shape}")
    array = np.moveaxis(array.astype(np.float64, copy=False), 1, -1)
    return array.reshape(-1, array.shape[-1])


@dataclass(frozen=True)
class DriftReference:
    """Per-channel statistics of the cut activations one client (vertical: one party) sent in
    training, as decoded by the server."""

    shape: tuple[int, ...]  # per-sample cut shape
    mean: np.ndarray
    std: np.ndarray
    lo: np.ndarray  # per-channel minimum over the training set
    hi: np.ndarray  # per-channel maximum
    samples: int

    @property
    def channels(self) -> int:
        return len(self.mean)

    def bounds(self, margin: float = MARGIN) -> tuple[np.ndarray, np.ndarray]:
        """The accepted range of each channel, widened by ``margin`` spans (see the rule)."""
        span = self.hi - self.lo
        slack = margin * span + FLOOR * float(span.mean()) + 1e-6
        return self.lo - slack, self.hi + slack

    def to_json(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "samples": self.samples,
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "min": [float(v) for v in self.lo],
            "max": [float(v) for v in self.hi],
        }

    @classmethod
    def from_json(cls, data: Any) -> DriftReference:
        """Read :meth:`to_json`'s output; a malformed one is a :class:`ConfigError`."""
        try:
            shape = tuple(int(d) for d in data["shape"])
            arrays = [np.asarray(data[k], dtype=np.float64) for k in ("mean", "std", "min", "max")]
            samples = int(data["samples"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed drift reference ({type(exc).__name__}: {exc})") from None
        sizes = {a.shape for a in arrays}
        if len(sizes) != 1 or arrays[0].ndim != 1 or not shape or shape[0] != len(arrays[0]):
            raise ConfigError(
                f"malformed drift reference: shape {shape} and per-channel sizes "
                f"{sorted(a.size for a in arrays)} disagree"
            )
        if not all(np.isfinite(a).all() for a in arrays):
            raise ConfigError("malformed drift reference: non-finite statistics")
        mean, std, lo, hi = arrays
        return cls(shape, mean, std, lo, hi, samples)


def fit_reference(batches: Iterable[torch.Tensor | np.ndarray]) -> DriftReference:
    """Per-channel mean, std, min and max over ``batches`` (one pass, streaming)."""
    count = 0
    samples = 0
    shape: tuple[int, ...] | None = None
    total = square = lo = hi = np.zeros(0)
    for batch in batches:
        values = _channels(batch)
        if shape is None:
            shape = tuple(int(d) for d in batch.shape[1:])
            total, square = np.zeros(values.shape[1]), np.zeros(values.shape[1])
            lo, hi = np.full(values.shape[1], np.inf), np.full(values.shape[1], -np.inf)
        total += values.sum(0)
        square += np.square(values).sum(0)
        lo, hi = np.minimum(lo, values.min(0)), np.maximum(hi, values.max(0))
        count += len(values)
        samples += int(batch.shape[0])
    if shape is None or count == 0:
        raise ValueError("a drift reference needs at least one batch")
    mean = total / count
    std = np.sqrt(np.maximum(square / count - np.square(mean), 0.0))
    return DriftReference(shape, mean, std, lo, hi, samples)


@dataclass
class Verdict:
    """One batch against its reference."""

    drift: bool
    out_fraction: float  # values outside their channel's accepted range
    #: Mean over the channels of |batch mean − training mean| / training std (information).
    mean_shift: float
    far_fraction: float = 0.0  # values far outside it
    #: The channels most out of range: (channel, out fraction, batch min, batch max, lo, hi).
    worst: list[tuple[int, float, float, float, float, float]] = field(default_factory=list)
    reason: str = ""

    def record(self) -> dict[str, Any]:
        """The JSON-able ``drift`` record of a reply's meta and of the metrics log."""
        return {
            "out_fraction": round(self.out_fraction, 6),
            "far_fraction": round(self.far_fraction, 6),
            "mean_shift": round(self.mean_shift, 3) if math.isfinite(self.mean_shift) else None,
            "channels": [
                {"channel": c, "out": round(f, 4), "seen": [a, b], "range": [lo, hi]}
                for c, f, a, b, lo, hi in self.worst
            ],
            **({"reason": self.reason} if self.reason else {}),
        }

    def sentence(self) -> str:
        """The verdict in one sentence (a refusal's message, a warning)."""
        if self.reason:
            return self.reason
        named = "; ".join(
            f"channel {c}: seen {_num(a)}..{_num(b)}, trained {_num(lo)}..{_num(hi)}"
            for c, _f, a, b, lo, hi in self.worst
        )
        return (
            f"{self.out_fraction:.0%} of the batch's cut activations are outside the range the "
            f"server was trained on ({named})"
        )


def _num(value: float) -> str:
    return f"{value:.3g}"


def check_batch(act: torch.Tensor | np.ndarray, reference: DriftReference) -> Verdict:
    """``act`` (a batch of decoded cut activations) against ``reference`` (see the rule)."""
    shape = tuple(int(d) for d in act.shape[1:])
    if shape != reference.shape:
        # the segment refuses a cut that does not fit; a fitting one of another layout (a
        # reshaped flat cut) has no comparable channels: say so rather than guess
        return Verdict(
            True,
            1.0,
            math.inf,
            1.0,
            reason=f"cut activations of shape {shape} do not match the {reference.shape} the "
            "server was trained on",
        )
    values = _channels(act)
    low, high = reference.bounds()
    far_low, far_high = reference.bounds(FAR)
    with np.errstate(invalid="ignore", over="ignore"):
        out = ~((values >= low) & (values <= high))  # NaN is out
        far = ~((values >= far_low) & (values <= far_high))
        per_channel = out.mean(0)
        mean = values.mean(0)
        shift = np.abs(mean - reference.mean) / np.maximum(reference.std, 1e-6)
    fraction, far_fraction = float(out.mean()), float(far.mean())
    worst = []
    for c in np.argsort(-per_channel, kind="stable")[:NAMED_CHANNELS]:
        if per_channel[c] == 0:
            break
        col = values[:, c]
        worst.append(
            (
                int(c),
                float(per_channel[c]),
                float(np.nanmin(col)) if np.isfinite(col).any() else math.nan,
                float(np.nanmax(col)) if np.isfinite(col).any() else math.nan,
                float(reference.lo[c]),
                float(reference.hi[c]),
            )
        )
    mean_shift = float(shift.mean()) if np.isfinite(shift).all() else math.inf
    drift = fraction > MAX_OUT_FRACTION or far_fraction > MAX_FAR_FRACTION
    return Verdict(drift, fraction, mean_shift, far_fraction, worst)


@dataclass
class DriftCounts:
    """What the guard did for one client."""

    checked: int = 0
    flagged: int = 0
    refused: int = 0


class DriftGuard:
    """Screens the cut activations of every FORWARD/PREDICT against the training reference.

    Parameters
    ----------
    references:
        One :class:`DriftReference` per client segment the server was trained with: one for
        vanilla/splitfed/ushape, one per party (in party order) for vertical.
    policy:
        ``flag`` (default): drifted steps are applied; the reply's meta and the metrics log
        carry a ``drift`` record, and a warning is logged (a client's first flagged batch and
        every ``warn_every``-th after). ``refuse``: a drifted training step is refused with
        ``FAILED_PRECONDITION`` before anything is applied; PREDICT is answered and flagged.

    A server trained from scratch over the network has no reference, and gets no guard: a
    reference learned from the first steps of a run would describe an untrained client segment
    (its activations move as it learns, so later legitimate steps would trip it), and one bad
    client among those first steps would become the reference itself.
    """

    def __init__(
        self,
        references: Sequence[DriftReference],
        policy: str = "flag",
        *,
        warn_every: int = WARN_EVERY,
    ) -> None:
        if policy not in POLICIES:
            raise ConfigError(
                f"unknown drift policy {policy!r}; expected one of {', '.join(POLICIES)}"
            )
        if not references:
            raise ConfigError("a drift guard needs a reference (a checkpoint trained in process)")
        self.references = list(references)
        self.policy = policy
        self.warn_every = max(1, warn_every)
        self.counts: dict[str, DriftCounts] = {}

    @classmethod
    def from_json(cls, data: Any, policy: str = "flag") -> DriftGuard | None:
        """A guard from a checkpoint's ``drift_reference`` list (``None`` without one)."""
        if not data:
            return None
        if not isinstance(data, list):
            raise ConfigError("malformed drift reference: expected a list (one per party)")
        return cls([DriftReference.from_json(item) for item in data], policy)

    def to_json(self) -> list[dict[str, Any]]:
        return [r.to_json() for r in self.references]

    def check(self, act: torch.Tensor, party: int = 0) -> Verdict:
        """``act`` of client segment ``party`` against its reference (changes nothing)."""
        if not 0 <= party < len(self.references):
            return Verdict(
                True,
                1.0,
                math.inf,
                1.0,
                reason=f"party {party} has no drift reference (the server was trained with "
                f"{len(self.references)})",
            )
        return check_batch(act, self.references[party])

    def screen(self, client: str, kind: str, step: int, verdict: Verdict, *, train: bool) -> bool:
        """Count ``verdict`` for ``client`` (under the server lock); True when the step must
        be refused (policy ``refuse``, a drifted training step)."""
        counts = self.counts.setdefault(client, DriftCounts())
        counts.checked += 1
        if not verdict.drift:
            return False
        if self.policy == "refuse" and train:
            counts.refused += 1  # the server logs the refusal (with its sentence)
            return True
        counts.flagged += 1
        if counts.flagged % self.warn_every == 1 or self.warn_every == 1:
            log.warning(
                "client %r sends activations off the training distribution (%s step %d, "
                "%d flagged so far): %s",
                client,
                kind,
                step,
                counts.flagged,
                verdict.sentence(),
            )
        return False

    def status(self) -> dict[str, Any]:
        """Policy and per-client counters (for ``status``)."""
        return {
            "policy": self.policy,
            "references": len(self.references),
            "clients": {
                name: {"checked": c.checked, "flagged": c.flagged, "refused": c.refused}
                for name, c in sorted(self.counts.items())
            },
        }
