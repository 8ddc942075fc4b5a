"""Split learning vs federated learning: per-client computation and communication per epoch.

The comparison the seed paper makes (Vepakomma et al., "Split learning for health", 2018,
tables of client TFLOPs and GB per client for SplitNN vs FedAvg at 100 and 500 clients), for the
same model, the same data and K clients that share N training samples equally.

Conventions (pure functions of numbers, so every value can be checked by hand):

* **samples per client** ``n = N / K`` (not rounded).
* **Computation per epoch.** Training costs 3x the forward FLOPs (forward + backward;
  :data:`~edgesplit.evaluate.latency.TRAIN_FLOPS_FACTOR`). A SplitNN client runs only its
  segment: ``3 x f_client x n``. A FedAvg client trains the whole model: ``3 x F_model x n``.
  Both shrink as 1/K, so their ratio ``f_client / F_model`` does not depend on K.
* **Communication per epoch.** FedAvg, one round per epoch: download the global model and
  upload the update, ``params x 4 B x 2`` (fp32), whatever K. SplitNN: every sample sends its
  activations up and gets its gradient down, ``(bytes up + bytes down per sample) x n``; at fp32
  that is ``cut elements x 4 B x n x 2``; with a codec it is the measured frame bytes per sample.
  (Vanilla SplitNN also hands the client segment's weights from client to client; that is not
  counted, as in the seed paper.)
* **Crossover.** SplitNN's per-client bytes fall as 1/K while FedAvg's stay constant, so SplitNN
  sends less once ``K > K* = bytes_per_sample x N / (8 x params)``. Compression divides
  ``bytes_per_sample`` and moves the crossover to fewer clients by the same factor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from edgesplit.errors import ConfigError
from edgesplit.evaluate.latency import TRAIN_FLOPS_FACTOR

#: Client counts compared by default (the seed paper uses 100 and 500).
DEFAULT_CLIENTS = (10, 100, 500)
#: Bytes of one fp32 value.
FP32_BYTES = 4


def samples_per_client(total_samples: float, clients: int) -> float:
    """``N / K``: each of K clients holds an equal share of the N training samples."""
    if clients < 1:
        raise ConfigError(f"number of clients must be >= 1, got {clients}")
    return total_samples / clients


def fedavg_bytes_per_client(params: int, rounds_per_epoch: int = 1,
                            bytes_per_param: int = FP32_BYTES) -> float:
    """FedAvg bytes per client per epoch: ``params x bytes_per_param x 2 x rounds``."""
    return float(params * bytes_per_param * 2 * rounds_per_epoch)


def fedavg_flops_per_client(model_forward_flops: float, n_samples: float) -> float:
    """FedAvg FLOPs per client per epoch: the full model trained on its samples."""
    return TRAIN_FLOPS_FACTOR * model_forward_flops * n_samples


def splitnn_flops_per_client(client_forward_flops: float, n_samples: float) -> float:
    """SplitNN FLOPs per client per epoch: only the client segment, forward and backward."""
    return TRAIN_FLOPS_FACTOR * client_forward_flops * n_samples


def splitnn_fp32_bytes_per_sample(cut_elements: int) -> tuple[float, float]:
    """(up, down) bytes per sample at fp32: the cut activation and its gradient, 4 B each."""
    return float(cut_elements * FP32_BYTES), float(cut_elements * FP32_BYTES)


def splitnn_bytes_per_client(bytes_up_per_sample: float, bytes_down_per_sample: float,
                             n_samples: float) -> float:
    """SplitNN bytes per client per epoch: ``(up + down per sample) x samples``."""
    return (bytes_up_per_sample + bytes_down_per_sample) * n_samples


def crossover_clients(total_samples: float, bytes_per_sample: float,
                      fedavg_bytes: float) -> float:
    """K* above which SplitNN sends fewer bytes per client than FedAvg.

    Solves ``bytes_per_sample x N / K = fedavg_bytes`` for K. Returns ``inf`` when FedAvg sends
    nothing (never crossed) and 0 when SplitNN sends nothing.
    """
    if fedavg_bytes <= 0:
        return math.inf
    return bytes_per_sample * total_samples / fedavg_bytes


def first_clients_below(crossover: float) -> int | None:
    """The smallest whole number of clients at which SplitNN sends strictly less (K > K*)."""
    if not math.isfinite(crossover):
        return None
    return max(1, math.floor(crossover) + 1)


@dataclass(frozen=True)
class FLRow:
    """Per-client, per-epoch resources at one client count."""

    clients: int
    samples_per_client: float
    splitnn_flops: float
    fedavg_flops: float
    splitnn_bytes_fp32: float
    splitnn_bytes_codec: float
    fedavg_bytes: float

    @property
    def cheaper_fp32(self) -> str:
        """Which sends fewer bytes per client at fp32 (``splitnn``, ``fedavg`` or ``tie``)."""
        return _cheaper(self.splitnn_bytes_fp32, self.fedavg_bytes)

    @property
    def cheaper_codec(self) -> str:
        """Which sends fewer bytes per client with the codec."""
        return _cheaper(self.splitnn_bytes_codec, self.fedavg_bytes)


@dataclass(frozen=True)
class FLComparison:
    """SplitNN (fp32 and with ``codec``) vs FedAvg (fp32 weights) per client, per epoch."""

    total_samples: float
    model_params: int
    client_params: int
    model_forward_flops: float
    client_forward_flops: float
    cut_elements: int
    cut: str | None
    codec: str
    codec_bytes_up_per_sample: float
    codec_bytes_down_per_sample: float
    rows: list[FLRow] = field(default_factory=list)
    crossover_fp32: float = math.inf
    crossover_codec: float = math.inf
    first_clients_fp32: int | None = None
    first_clients_codec: int | None = None
    rounds_per_epoch: int = 1

    @property
    def compression_factor(self) -> float:
        """How many times fewer bytes per sample the codec sends than fp32 (moves K* by this)."""
        fp32 = sum(splitnn_fp32_bytes_per_sample(self.cut_elements))
        codec = self.codec_bytes_up_per_sample + self.codec_bytes_down_per_sample
        return fp32 / codec if codec > 0 else math.inf

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["rows"] = [dict(asdict(r), cheaper_fp32=r.cheaper_fp32,
                            cheaper_codec=r.cheaper_codec) for r in self.rows]
        out["compression_factor"] = self.compression_factor
        out["conventions"] = CONVENTIONS
        return out


#: One-paragraph statement of the conventions, written into results.json and report.md.
CONVENTIONS = (
    "Per client, per epoch; K clients share N samples equally (n = N/K). FLOPs: training = 3x "
    "forward; SplitNN client = 3 x client-segment forward FLOPs x n, FedAvg client = 3 x model "
    "forward FLOPs x n. Bytes: FedAvg = params x 4 B x 2 (download + upload, 1 round per epoch); "
    "SplitNN = (bytes up + bytes down per sample) x n, at fp32 cut elements x 4 B x 2 x n, with "
    "the codec its measured frame bytes. Crossover K* = bytes per sample x N / FedAvg bytes: "
    "SplitNN sends less per client for K > K*."
)


def compare(*, total_samples: float, model_params: int, client_params: int,
            model_forward_flops: float, client_forward_flops: float, cut_elements: int,
            codec: str, codec_bytes_up_per_sample: float, codec_bytes_down_per_sample: float,
            clients: Sequence[int] = DEFAULT_CLIENTS, cut: str | None = None,
            rounds_per_epoch: int = 1) -> FLComparison:
    """Build the comparison table for each client count in ``clients``."""
    if total_samples <= 0 or model_params <= 0 or cut_elements <= 0:
        raise ConfigError("FL comparison needs total_samples, model_params and cut_elements > 0")
    fedavg = fedavg_bytes_per_client(model_params, rounds_per_epoch)
    up32, down32 = splitnn_fp32_bytes_per_sample(cut_elements)
    codec_bps = codec_bytes_up_per_sample + codec_bytes_down_per_sample
    rows = []
    for k in clients:
        n = samples_per_client(total_samples, k)
        rows.append(FLRow(
            clients=k, samples_per_client=n,
            splitnn_flops=splitnn_flops_per_client(client_forward_flops, n),
            fedavg_flops=fedavg_flops_per_client(model_forward_flops, n),
            splitnn_bytes_fp32=splitnn_bytes_per_client(up32, down32, n),
            splitnn_bytes_codec=splitnn_bytes_per_client(
                codec_bytes_up_per_sample, codec_bytes_down_per_sample, n),
            fedavg_bytes=fedavg,
        ))
    k32 = crossover_clients(total_samples, up32 + down32, fedavg)
    kc = crossover_clients(total_samples, codec_bps, fedavg)
    return FLComparison(
        total_samples=total_samples, model_params=model_params, client_params=client_params,
        model_forward_flops=model_forward_flops, client_forward_flops=client_forward_flops,
        cut_elements=cut_elements, cut=cut, codec=codec,
        codec_bytes_up_per_sample=codec_bytes_up_per_sample,
        codec_bytes_down_per_sample=codec_bytes_down_per_sample, rows=rows,
        crossover_fp32=k32, crossover_codec=kc, first_clients_fp32=first_clients_below(k32),
        first_clients_codec=first_clients_below(kc), rounds_per_epoch=rounds_per_epoch,
    )


def _cheaper(splitnn: float, fedavg: float) -> str:
    if splitnn < fedavg:
        return "splitnn"
    if fedavg < splitnn:
        return "fedavg"
    return "tie"
