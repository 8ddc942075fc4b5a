"""The in-process split training engine: every configuration of the design, run through real
client and server roles that exchange real frames over a transport.

:func:`run_training` is what ``edgesplit train``, ``edgesplit demo`` and the evaluator call.
"""

from __future__ import annotations

import copy
import logging
import math
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from edgesplit.codecs.entropy import ModelTable, models_to_json, use_models
from edgesplit.data import Dataset, iid_shard_indices, load_dataset
from edgesplit.errors import ConfigError, TrainingDiverged
from edgesplit.models import (
    DEFAULT_BOTTLENECK_CUTS,
    DEFAULT_CUTS,
    DEFAULT_USHAPE_CUTS,
    build_model,
    family_of,
)
from edgesplit.split.bottleneck import BottleneckSpec, with_decoder, with_encoder
from edgesplit.split.cut import check_chain, cut_model, cut_ushape, parse_cuts
from edgesplit.split.defense import parse_defense
from edgesplit.split.preprocess import refit, with_standardize
from edgesplit.split.profile import profile_segment
from edgesplit.train.client import SplitClient, StepResult
from edgesplit.train.frames import CodecStats, TensorCodec
from edgesplit.train.server import SplitServer
from edgesplit.train.server_drift import DriftReference, fit_reference
from edgesplit.train.spec import CONFIGS, TrainResult, TrainSpec
from edgesplit.transport.base import Handler, Transport
from edgesplit.transport.inprocess import InProcessTransport
from edgesplit.wire.frame import decode_frame

log = logging.getLogger(__name__)

#: ``evaluate --defense`` checks this: the engine applies :mod:`edgesplit.split.defense`.
DEFENSES_APPLIED = True

#: Makes the transport a client uses; the default is in-process.
TransportFactory = Callable[[Handler, str], Transport]
#: Called after each epoch with (epoch, epochs, history row) — progress bars hook in here.
EpochCallback = Callable[[int, int, dict[str, float]], None]
#: Called after each training step with (epoch, step in epoch, steps in epoch).
StepCallback = Callable[[int, int, int], None]


@dataclass
class TrainedSplit:
    """A finished run: what it measured and the trained segments (for ``--save``)."""

    spec: TrainSpec
    result: TrainResult
    dataset: Dataset
    client_segments: list[nn.Module]  # one per client (vertical: one per party)
    server_segment: nn.Module
    head: nn.Module | None = None  # ushape: the client's last layers
    cuts: tuple[str, ...] = ()
    feature_blocks: list[tuple[int, int]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Index batches of one shuffled epoch (the last batch may be smaller)."""
    order = rng.permutation(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def epoch_plan(
    config: str, n: int, clients: int, index: int, seed: int, epoch: int, batch_size: int
) -> list[np.ndarray]:
    """The sample rows of every batch client ``index`` trains on in ``epoch``.

    In-process and networked runs call this same function, so a client process that trains
    over gRPC sees exactly the batches its in-process twin sees. Vertical parties share one
    order (they hold the same samples); other clients own a shard and an order of their own.
    """
    if config == "vertical":
        return list(batches(n, batch_size, np.random.default_rng([seed, epoch])))
    own = shards(n, clients, seed)[index] if clients > 1 else np.arange(n)
    rng = np.random.default_rng([seed, epoch, index])
    return [own[idx] for idx in batches(len(own), batch_size, rng)]


def client_rows(spec: TrainSpec, n: int, index: int) -> np.ndarray:
    """The training rows client ``index`` holds (all of them for a single client)."""
    return shards(n, spec.clients, spec.seed)[index] if spec.clients > 1 else np.arange(n)


def shards(n: int, clients: int, seed: int) -> list[np.ndarray]:
    """Split sample indices into ``clients`` IID shards: the same cut the edge client's
    ``--shard I/N`` makes, so frozen, trainable and in-process clients hold the same data."""
    return [iid_shard_indices(n, i, clients, seed=seed) for i in range(clients)]


def feature_blocks(num_features: int, parties: int, spec: str | None) -> list[tuple[int, int]]:
    """Vertical partition of the last feature axis: ``"0:10,10:30"`` or K contiguous blocks."""
    if spec:
        blocks = []
        for part in spec.split(","):
            try:
                lo, hi = (int(v) for v in part.split(":"))
            except ValueError:
                raise ConfigError(f"--feature-split part {part!r} must be START:STOP") from None
            if not 0 <= lo < hi <= num_features:
                raise ConfigError(f"--feature-split block {part!r} is outside 0:{num_features}")
            blocks.append((lo, hi))
        if len(blocks) != parties:
            raise ConfigError(f"--feature-split gives {len(blocks)} blocks for {parties} parties")
        return blocks
    if parties > num_features:
        raise ConfigError(f"{parties} parties cannot split {num_features} features")
    edges = np.linspace(0, num_features, parties + 1).round().astype(int)
    return [(int(edges[i]), int(edges[i + 1])) for i in range(parties)]


def _validate(spec: TrainSpec) -> None:
    if spec.config not in CONFIGS:
        raise ConfigError(f"unknown config {spec.config!r}; valid: {', '.join(CONFIGS)}")
    if spec.clients < 1:
        raise ConfigError(f"--clients must be at least 1, got {spec.clients}")
    if spec.config == "vertical" and spec.clients < 2:
        raise ConfigError("vertical needs at least 2 parties: pass --clients 2 (or more)")
    if spec.epochs < 1 or spec.batch_size < 1 or not spec.lr > 0:
        raise ConfigError("--epochs and --batch-size must be ≥ 1 and --lr > 0")
    from edgesplit.codecs import parse_codec

    parse_codec(spec.codec)
    parse_codec(spec.grad_codec)


def resolve_cuts(spec: TrainSpec, input_shape: tuple[int, ...]) -> tuple[str, ...]:
    family = family_of(spec.model, input_shape)
    default: str | tuple[str, str] | None = None
    if family is not None:
        if spec.config == "ushape":
            default = DEFAULT_USHAPE_CUTS[family]
        elif spec.bottleneck:
            default = DEFAULT_BOTTLENECK_CUTS[family]
        else:
            default = DEFAULT_CUTS[family]
    return parse_cuts(spec.cut, spec.config, default)


def _fused_upper(upper: nn.Module, fused_width: int) -> nn.Sequential:
    """Vertical: the server's upper layers take the concatenation of every party's output, so
    its first Linear layer is rebuilt for that width (same output width, fresh weights)."""
    if not isinstance(upper, nn.Sequential):
        raise ConfigError(
            "vertical needs a model whose layers after the cut are a chain (an nn.Sequential): "
            "the server feeds the joined party features to its first Linear layer; this "
            "model's server segment has a custom forward"
        )
    layers = list(upper.named_children())
    for i, (name, layer) in enumerate(layers):
        if isinstance(layer, nn.Flatten):
            continue
        if isinstance(layer, nn.Linear):
            layers[i] = (name, nn.Linear(fused_width, layer.out_features))
            return nn.Sequential(OrderedDict(layers))
        break
    raise ConfigError(
        "vertical needs a cut whose server segment starts with a Linear layer (it concatenates "
        f"the parties' features); the server segment starts with {layers[0][0]!r}"
    )


@dataclass
class SplitParts:
    """The segments of one split model (before any client copies are made)."""

    lowers: list[nn.Module]  # one, or one per vertical party
    server: nn.Module
    head: nn.Module | None
    cuts: tuple[str, ...]
    blocks: list[tuple[int, int]]  # vertical feature blocks
    party_shapes: list[tuple[int, ...]]
    #: Per party, the per-sample cut shape *without* the bottleneck: the fp32 reference every
    #: ratio is measured against (the same model without bottleneck at the same position).
    reference_shapes: list[tuple[int, ...]] = field(default_factory=list)


def build_split(
    spec: TrainSpec,
    input_shape: tuple[int, ...],
    num_classes: int,
    example: torch.Tensor | None = None,
) -> SplitParts:
    """Build the model ``spec`` names for this data and cut it as its configuration needs
    (with the learned bottleneck of ``spec.bottleneck`` at the first cut)."""
    cuts = resolve_cuts(spec, input_shape)
    model = build_model(spec.model, input_shape, num_classes)
    if example is not None:
        check_chain(model, example)
    neck = BottleneckSpec.parse(spec.bottleneck) if spec.bottleneck else None
    # privacy defenses act on the cut itself, before any bottleneck squeezes it
    defense = parse_defense(spec.defense, seed=spec.seed)

    def cut_shape(lower: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(profile_segment(lower, shape).output_shape)

    if spec.config in ("vanilla", "splitfed", "ushape"):
        if spec.config == "ushape":
            lower, upper, head = cut_ushape(model, *cuts)
        else:
            (lower, upper), head = cut_model(model, cuts[0]), None
        lower = defense.wrap_lower(lower)
        if spec.normalize:
            lower = with_standardize(lower, input_shape)
        ref = cut_shape(lower, input_shape)
        if neck is not None:
            lower, upper = with_encoder(lower, neck, ref), with_decoder(upper, neck, ref)
        return SplitParts([lower], upper, head, cuts, [], [input_shape], [ref])
    blocks = feature_blocks(input_shape[-1], spec.clients, spec.feature_split)
    lowers, shapes, refs, width = [], [], [], 0
    for lo, hi in blocks:
        shape = (*input_shape[:-1], hi - lo)
        lower, _ = cut_model(build_model(spec.model, shape, num_classes), cuts[0])
        lower = defense.wrap_lower(lower)
        if spec.normalize:
            lower = with_standardize(lower, shape)
        refs.append(cut_shape(lower, shape))
        if neck is not None:
            # each party sends its own D channels; the server's fused first layer decodes them
            lower = with_encoder(lower, neck, refs[-1])
        lowers.append(lower)
        shapes.append(shape)
        width += math.prod(cut_shape(lower, shape))
    _, upper = cut_model(model, cuts[0])
    return SplitParts(lowers, _fused_upper(upper, width), None, cuts, blocks, shapes, refs)


class _Run:
    """State of one in-process run (kept small: the roles hold the real state)."""

    def __init__(self, spec: TrainSpec, transport_factory: TransportFactory | None) -> None:
        _validate(spec)
        self.spec = spec
        self.data = load_dataset(spec.data)
        self.factory = transport_factory or (lambda handler, _name: InProcessTransport(handler))
        torch.manual_seed(spec.seed)
        self.group = uuid.uuid4().hex[:8]
        self.on_step: StepCallback | None = None
        self.input_shape = self.data.input_shape
        self._build()

    def _build(self) -> None:
        spec, data = self.spec, self.data
        parts = build_split(
            spec, self.input_shape, data.num_classes, example=torch.from_numpy(data.x_train[:2])
        )
        self.cuts, self.blocks, self.head = parts.cuts, parts.blocks, parts.head
        self.party_shapes = parts.party_shapes
        refs = parts.reference_shapes
        server_seg = parts.server
        lowers, heads = parts.lowers, [parts.head] * len(parts.lowers)
        if spec.config in ("vanilla", "ushape", "splitfed"):
            # every client starts from the same initial weights, each with its own copy
            lowers = [parts.lowers[0]] + [
                copy.deepcopy(parts.lowers[0]) for _ in range(spec.clients - 1)
            ]
            heads = [parts.head] + [copy.deepcopy(parts.head) for _ in range(spec.clients - 1)]
        n = len(data.y_train)
        for i, lower in enumerate(lowers):
            # each client's input statistics come from its own training rows (vertical: its
            # features of every row); a vanilla hand-off or a FedAvg round then carries them on
            rows = np.arange(n) if spec.config == "vertical" else client_rows(spec, n, i)
            refit(lower, self.party_x(data.x_train[rows], i).numpy())
        self.defense = parse_defense(spec.defense, seed=spec.seed)
        self.server = SplitServer(
            spec.config,
            server_seg,
            codec=spec.codec,
            grad_codec=spec.grad_codec,
            lr=spec.lr,
            defense=self.defense,
            num_classes=data.num_classes,
        )
        self.clients = [
            SplitClient(
                name=f"client-{i}",
                lower=lower,
                transport=self.factory(self.server.handle, f"client-{i}"),
                codec=spec.codec,
                grad_codec=spec.grad_codec,
                num_classes=data.num_classes,
                # labels as bare packed class ids: this server knows the class count
                packed_labels=self.server.packs_labels(),
                lr=spec.lr,
                head=heads[i],
                party=i if spec.config == "vertical" else None,
                parties=spec.clients if spec.config == "vertical" else None,
                group=self.group,
                send_labels=(spec.config != "vertical" or i == 0),
                reference_shape=refs[i if spec.config == "vertical" else 0],
                defense=self.defense,
            )
            for i, lower in enumerate(lowers)
        ]

    # ------------------------------------------------------------------ data views
    def party_x(self, x: np.ndarray, party: int) -> torch.Tensor:
        if self.spec.config == "vertical":
            lo, hi = self.blocks[party]
            x = x[..., lo:hi]
        return torch.from_numpy(np.ascontiguousarray(x))

    # ------------------------------------------------------------------ schedules
    def train_epoch(self, epoch: int) -> dict[str, float]:
        spec, data = self.spec, self.data
        results: list[StepResult] = []
        n_clients = len(self.clients)
        plans = [
            epoch_plan(
                spec.config, len(data.y_train), n_clients, i, spec.seed, epoch, spec.batch_size
            )
            for i in range(n_clients)
        ]

        steps = len(plans[0]) if spec.config == "vertical" else sum(len(p) for p in plans)
        done = 0

        def step(i: int, client: SplitClient, rows: np.ndarray) -> StepResult:
            nonlocal done
            if self.on_step is not None and (spec.config != "vertical" or i == 0):
                self.on_step(epoch, done, steps)
                done += 1
            return client.train_step(
                self.party_x(data.x_train[rows], i),
                torch.from_numpy(data.y_train[rows]),
                ids=rows if spec.config == "vertical" else None,
                report=rows is plans[i][-1],  # the server's loss and accuracy, once an epoch
            )

        if spec.config in ("vanilla", "ushape"):
            # SplitNN schedule: clients train in turn, each from the previous one's weights
            for i, client in enumerate(self.clients):
                if n_clients > 1 and (i > 0 or epoch > 0):
                    client.take_over(turn=epoch * n_clients + i)
                results += [step(i, client, rows) for rows in plans[i]]
                if n_clients > 1:
                    client.hand_off()
        elif spec.config == "splitfed":
            # the clients run in parallel; in one process their batches interleave
            for b in range(max(len(p) for p in plans)):
                results += [
                    step(i, c, plans[i][b]) for i, c in enumerate(self.clients) if b < len(plans[i])
                ]
            def average(i: int, c: SplitClient) -> None:
                c.federated_average(epoch, i, n_clients, sum(len(rows) for rows in plans[i]))

            self._parallel(average)
        else:  # vertical: every party runs the same batch of sample ids, at once
            for b in range(len(plans[0])):

                def party_step(i: int, c: SplitClient, b: int = b) -> StepResult:
                    return step(i, c, plans[i][b])

                results.append(self._parallel(party_step)[0])
        for client in self.clients:
            client.refit_entropy_model()
        n = sum(r.n for r in results)
        return {
            "loss": sum(r.loss * r.n for r in results) / n,
            "train_accuracy": sum(r.correct for r in results) / n,
        }

    def _parallel(self, fn: Callable[[int, SplitClient], Any]) -> list[Any]:
        """Run ``fn`` for every client at once (barriers on the server need all of them)."""
        with ThreadPoolExecutor(len(self.clients)) as pool:
            futures = [pool.submit(fn, i, c) for i, c in enumerate(self.clients)]
            return [f.result() for f in futures]

    def drift_reference(self, kept: list[SplitClient]) -> list[DriftReference]:
        """Per kept client (vertical: per party), statistics of the decoded cut activations of
        the whole training split, as the server sees them: through the client segment and the
        codec, in batches of the training size. Each segment runs once in train mode (dropout,
        train-time defenses) and once in eval mode (what inference sends); on a copy, with the
        random state restored, so nothing the run trained or reports changes."""
        spec, x = self.spec, self.data.x_train
        parties = range(len(kept)) if spec.config == "vertical" else [0]
        references = []
        for i, client in zip(parties, kept, strict=True):
            lower = copy.deepcopy(client.lower)
            codec = TensorCodec.from_spec(client.act.codec, measure_snr=False)
            codec.models = client.act.models  # the entropy models its frames reference

            def decoded(
                lower: nn.Module = lower,
                codec: TensorCodec = codec,
                i: int = i,
                models: ModelTable = client.act.models,
            ) -> Iterator[torch.Tensor]:
                for train in (True, False):
                    lower.train(train)
                    for start in range(0, len(x), spec.batch_size):
                        act = lower(self.party_x(x[start : start + spec.batch_size], i))
                        with use_models(models):
                            frame = codec.encode(act)
                            yield torch.from_numpy(decode_frame(frame, self.server.limits))

            with torch.random.fork_rng(), torch.no_grad():
                references.append(fit_reference(decoded()))
        return references

    def test_accuracy(self) -> float:
        data, spec = self.data, self.spec
        correct = 0
        for start in range(0, len(data.y_test), 256):
            rows = slice(start, start + 256)
            if spec.config == "vertical":
                def party_predict(i: int, c: SplitClient, rows: slice = rows) -> np.ndarray:
                    return c.predict(self.party_x(data.x_test[rows], i))

                preds = self._parallel(party_predict)[0]
            else:
                # after the last hand-off / average, the last client holds the current weights
                preds = self.clients[-1].predict(torch.from_numpy(data.x_test[rows]))
            correct += int((preds == data.y_test[rows]).sum())
        return correct / len(data.y_test)

    def result(self, history: list[dict[str, float]], accuracy: float) -> TrainResult:
        spec = self.spec
        per_client = [c.traffic for c in self.clients]
        # one profile per distinct client segment: each vertical party, or the shared shape
        shapes = self.party_shapes if spec.config == "vertical" else [self.input_shape]
        profiles = [
            profile_segment(c.lower, shape) for c, shape in zip(self.clients, shapes, strict=False)
        ]
        client_params = sum(p.params for p in profiles)
        client_flops = sum(p.flops for p in profiles)
        server_in = (
            [sum(math.prod(p.output_shape) for p in profiles)]
            if spec.config == "vertical"
            else profiles[0].output_shape
        )
        server_prof = profile_segment(self.server.segment, tuple(server_in))
        if self.head is not None:
            head_prof = profile_segment(self.head, tuple(server_prof.output_shape))
            client_params += head_prof.params
            client_flops += head_prof.flops
        act_stats = [c.act.stats for c in self.clients]
        # one CodecStats over every client's activations: the run's SNR by the same formula
        pooled = CodecStats(signal_power=sum(s.signal_power for s in act_stats),
                            noise_power=sum(s.noise_power for s in act_stats))

        def total(field: str) -> int:
            return sum(getattr(b, field) for b in per_client)

        return TrainResult(
            config=spec.config,
            codec=self.clients[0].act.codec.spec,
            grad_codec=self.clients[0].grad.codec.spec,
            accuracy=accuracy,
            loss=history[-1]["loss"] if history else math.nan,
            bytes_up=total("bytes_up"),
            bytes_down=total("bytes_down"),
            bytes_up_fp32=total("bytes_up_fp32"),
            bytes_down_fp32=total("bytes_down_fp32"),
            weights_up=total("weights_up"),
            weights_down=total("weights_down"),
            cut_shape=profiles[0].output_shape,
            train_samples=len(self.data.y_train),
            epochs=spec.epochs,
            snr_db=pooled.snr_db,
            encode_seconds=sum(s.encode_seconds for s in act_stats),
            decode_seconds=self.server.act_codec.stats.decode_seconds,
            client_params=client_params,
            server_params=server_prof.params,
            client_flops=client_flops,
            server_flops=server_prof.flops,
            clients=per_client,
            history=history,
        )


def run_training(
    spec: TrainSpec,
    *,
    on_epoch: EpochCallback | None = None,
    on_step: StepCallback | None = None,
    transport_factory: TransportFactory | None = None,
) -> TrainedSplit:
    """Train ``spec`` in one process, through the real codecs and frames, and report.

    Raises
    ------
    ConfigError, CodecError: for a bad spec (unknown config, codec, cut, model or data).
    """
    run = _Run(spec, transport_factory)
    run.on_step = on_step
    history: list[dict[str, float]] = []
    diverged = False
    for epoch in range(spec.epochs):
        try:
            row = run.train_epoch(epoch)
        except TrainingDiverged as exc:
            # a result, not a crash: a sweep must record that this cut × codec does not train
            log.warning("%s %s: %s", spec.config, spec.codec, exc)
            diverged = True
            break
        history.append(row)
        if on_epoch:
            on_epoch(epoch, spec.epochs, row)
    accuracy = run.test_accuracy()
    result = run.result(history, accuracy)
    result.diverged = diverged
    # the clients a checkpoint keeps: every vertical party, else the last (freshest weights)
    kept = run.clients if spec.config == "vertical" else run.clients[-1:]
    models = [m for c in kept for m in c.act.models.models.values()]
    # what the served server screens incoming activations against (server_drift)
    # (none for a diverged run: its activations describe nothing worth guarding)
    reference = None if diverged else [r.to_json() for r in run.drift_reference(kept)]
    return TrainedSplit(
        spec=spec,
        result=result,
        dataset=run.data,
        client_segments=[c.lower for c in run.clients],
        server_segment=run.server.segment,
        head=run.head,
        cuts=run.cuts,
        feature_blocks=run.blocks,
        # what each kept client encodes with now: the entropy model it fitted last, by id
        meta={"codecs": [c.act.codec.spec for c in kept],
              "entropy_models": models_to_json(models),
              "drift_reference": reference},
    )
