"""What a split training run is asked to do (:class:`TrainSpec`) and what it reports
(:class:`TrainResult`). Plain dataclasses so the CLI, the evaluator and tests share one shape."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edgesplit.jsonable import jsonable

CONFIGS = ("vanilla", "ushape", "vertical", "splitfed")


@dataclass
class TrainSpec:
    """One split training run.

    Attributes
    ----------
    data: built-in name (``digits``, ``breast_cancer``) or a path to an ``.npz``.
    config: one of :data:`CONFIGS`.
    clients: number of clients (vanilla, splitfed) or parties (vertical).
    model: ``auto`` (pick by input shape), a family name (``mlp``, ``cnn1d``, ``cnn2d``) or a
        user factory ``path/to/file.py:build`` / ``package.module:build``.
    cut: layer name to cut after; ushape takes two names ``"a,b"``; ``None`` = family default.
    codec / grad_codec: codec specs for activations (up) and gradients (down).
    epochs, batch_size, lr, seed: the usual.
    feature_split: vertical only, e.g. ``"0:10,10:30"``; default = K contiguous blocks.
    bottleneck: a learned bottleneck at the cut, ``"D[:BITS]"`` (e.g. ``"16:2"``); ``None`` = none.
    defense: privacy defenses at the cut (see :mod:`edgesplit.split.defense`); ``None`` = none.
    normalize: start each client segment with input standardization fitted on that client's
        own training rows (:mod:`edgesplit.split.preprocess`), exported inside client.onnx.
    """

    data: str = "digits"
    config: str = "vanilla"
    clients: int = 1
    model: str = "auto"
    cut: str | None = None
    codec: str = "fp32"
    grad_codec: str = "fp32"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.02
    seed: int = 0
    feature_split: str | None = None
    bottleneck: str | None = None
    defense: str | None = None
    normalize: bool = True


@dataclass
class ClientBytes:
    """Bytes one client sent and received: what its steps put on the wire.

    ``bytes_*`` count the cut-layer traffic (activations, labels, gradients, ushape middle
    outputs, entropy models) as serialised envelopes — frames, tensor names, ids and meta
    (gRPC's own 5-byte message prefix and HTTP/2 framing are not counted). ``envelope_*`` is the
    part of ``bytes_*`` that is not frames. ``*_fp32`` are the same steps with every cut tensor
    as an fp32 frame of the cut *without* bottleneck: the reference of every ratio.
    ``weights_*`` count model weights that travelled for the vanilla hand-off or the splitfed
    average, reported apart so the codec ratio is not diluted and nothing is hidden either.
    """

    client: str
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_up_fp32: int = 0
    bytes_down_fp32: int = 0
    envelope_up: int = 0
    envelope_down: int = 0
    weights_up: int = 0
    weights_down: int = 0


@dataclass
class TrainResult:
    """What a run measured. Byte counts are totals over all epochs and clients."""

    config: str
    codec: str
    grad_codec: str
    accuracy: float
    loss: float
    bytes_up: int
    bytes_down: int
    bytes_up_fp32: int
    bytes_down_fp32: int
    weights_up: int  # hand-off / FedAvg weight frames (not in bytes_up)
    weights_down: int
    cut_shape: list[int]
    train_samples: int  # samples seen per epoch, summed over clients
    epochs: int
    snr_db: float  # mean SNR of decoded vs original activations (inf for fp32)
    encode_seconds: float  # time spent in activation encode, whole run
    decode_seconds: float  # time spent in activation decode, whole run
    client_params: int
    server_params: int
    client_flops: int  # forward FLOPs per sample of the client segment(s)
    server_flops: int  # forward FLOPs per sample of the server segment
    clients: list[ClientBytes] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: loss, accuracy
    diverged: bool = False  # stopped early: a step's loss or gradients were not finite

    @property
    def ratio_up(self) -> float:
        return self.bytes_up_fp32 / self.bytes_up if self.bytes_up else float("nan")

    @property
    def ratio_down(self) -> float:
        return self.bytes_down_fp32 / self.bytes_down if self.bytes_down else float("nan")

    def to_json(self) -> dict[str, Any]:
        """A dict that ``json.dumps`` writes as strict JSON (non-finite floats become null)."""
        out = asdict(self)
        out["ratio_up"] = self.ratio_up
        out["ratio_down"] = self.ratio_down
        return jsonable(out)
