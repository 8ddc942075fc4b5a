"""The server role: holds the full-precision upper (or middle) segment and answers protocol
messages. The same object serves the in-process engine and the gRPC server.

It never trusts a peer: every frame is decoded by the hardened decoder, bad input becomes an
``INVALID_ARGUMENT`` error reply (never an exception that would take the server down), and a
repeated step is answered from the record instead of being applied twice.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
import uuid
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from edgesplit.codecs.entropy import EntropyModel, ModelTable, use_models
from edgesplit.codecs.fixed import FixedRange
from edgesplit.data import label_dtype
from edgesplit.errors import (
    CodecError,
    ConfigError,
    FrameError,
    ProtocolError,
    TrainingDiverged,
)
from edgesplit.split.bottleneck import param_groups
from edgesplit.split.defense import Defense
from edgesplit.train.barrier import Barriers
from edgesplit.train.controller import BitrateController
from edgesplit.train.frames import TensorCodec, decode_labels
from edgesplit.train.probe import compare
from edgesplit.wire.frame import FrameLimits, decode_frame, encode_frame, fp32_frame_size
from edgesplit.wire.messages import (
    Kind,
    Message,
    error_message,
    message_from_dict,
    message_to_dict,
)

log = logging.getLogger(__name__)

#: Kinds whose effect must happen once per step (their replies are recorded for retries).
_RECORDED = {Kind.FORWARD, Kind.MIDDLE_GRAD, Kind.WEIGHTS}
_RECORDS_PER_CLIENT = 64
#: Sessions whose records are kept; the oldest is forgotten beyond this (a client that returns
#: after that long starts a new session).
_MAX_SESSIONS = 10_000
#: Default per-frame limits on a server: 16 Mi elements, 64 MiB decoded.
SERVER_LIMITS = FrameLimits(max_elements=1 << 24, max_decoded_bytes=1 << 26)


@dataclass
class ClientStats:
    """What the server has seen from one client."""

    steps: int = 0
    samples: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    labelled: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    repeats: int = 0
    errors: int = 0
    last_seen: float = 0.0
    probe_steps: int = 0  # counters at this client's previous probe (interval start)
    probe_bytes_in: int = 0

    def row(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "samples": self.samples,
            "loss": self.loss_sum / self.labelled if self.labelled else None,
            "accuracy": self.correct / self.labelled if self.labelled else None,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "repeats": self.repeats,
            "errors": self.errors,
            "last_seen": self.last_seen,
        }


class SplitServer:
    """Server side of split learning for one configuration.

    Parameters
    ----------
    config:
        ``vanilla``/``splitfed`` (server holds the upper layers and the loss), ``ushape`` (server
        holds the middle; never sees labels or logits) or ``vertical`` (server concatenates the
        parties' cut outputs, then runs its upper layers).
    segment:
        The server's full-precision segment; trained in place.
    codec, grad_codec:
        Codec specs for tensors the server sends: activations (ushape ``mid``) and gradients.
    optimizer:
        Defaults to SGD(lr, momentum) over ``segment``'s parameters.
    wait_timeout:
        Seconds a vertical party or a FedAvg participant waits for the others.
    on_probe:
        Called with a dict of metrics whenever a probe (reference fp32 batch) is evaluated.
    limits:
        What one received frame may claim and inflate to: a 600-byte zstd frame can otherwise
        decode to half a gigabyte. ``serve --max-tensor-mib`` sets it.
    defense:
        Privacy defenses (:mod:`edgesplit.split.defense`); the server applies the label-leak
        one to the cut gradients it returns.
    controller:
        Adaptive bitrate (:class:`~edgesplit.train.controller.BitrateController`): probes move
        each client along a ladder of codecs; the reply's meta ``codec`` tells it.
    run_id:
        The training run the segment's weights come from (a checkpoint's ``run_id``); a HELLO
        naming another run is refused.
    spec:
        The training settings the WELCOME reply tells clients (model, cuts, seed, epochs, ...),
        so a networked client builds exactly the segment the server expects.
    """

    def __init__(
        self,
        config: str,
        segment: nn.Module,
        *,
        codec: str = "fp32",
        grad_codec: str = "fp32",
        lr: float = 0.05,
        momentum: float = 0.9,
        optimizer: torch.optim.Optimizer | None = None,
        wait_timeout: float = 120.0,
        on_probe: Callable[[dict[str, Any]], None] | None = None,
        spec: dict[str, Any] | None = None,
        limits: FrameLimits = SERVER_LIMITS,
        defense: Defense | None = None,
        run_id: str | None = None,
        controller: BitrateController | None = None,
    ) -> None:
        self.config = config
        self.segment = segment
        self.optimizer = optimizer or torch.optim.SGD(
            param_groups(segment, lr), lr=lr, momentum=momentum
        )
        self.limits = limits
        #: Moves each probing client along a ladder of codecs (``serve --ladder --max-drop``).
        self.controller = controller
        #: The training run whose weights this server holds: a bundle of another run is refused.
        self.run_id = run_id
        #: The label-leak defense perturbs every cut gradient this server returns.
        self.defense = defense or Defense()
        self.act_codec = TensorCodec.from_spec(codec, measure_snr=False, limits=limits)
        self.grad_codec = TensorCodec.from_spec(grad_codec, measure_snr=False, limits=limits)
        # ushape's middle outputs are not bounded to [0, 1]: a fixed-range (bottleneck) codec
        # cannot carry them, so they go down as 8-bit affine codes then
        self.mid_codec = (
            TensorCodec.from_spec("q8", measure_snr=False, limits=limits)
            if isinstance(self.act_codec.codec.value, FixedRange)
            else self.act_codec
        )
        #: Entropy models each client sent (its own table: no client can touch another's).
        self._models: dict[str, ModelTable] = {}
        self.loss_fn = nn.CrossEntropyLoss()
        self.wait_timeout = wait_timeout
        self.on_probe = on_probe
        self.stats: dict[str, ClientStats] = defaultdict(ClientStats)
        self.probes: deque[dict[str, Any]] = deque(maxlen=1000)  # the latest, for tests/status
        self.latest_probe: dict[str, dict[str, Any]] = {}
        self.steps_applied = 0
        self._cond = threading.Condition(threading.RLock())
        self._records: dict[tuple[str, str], OrderedDict[tuple[str, int], Message]] = defaultdict(
            OrderedDict
        )
        self._ushape_graphs: dict[tuple[str, str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._barriers = Barriers(self._cond, lambda: self.wait_timeout)
        self._handoff: dict[str, bytes] | None = None
        self.handoffs = 0
        self.spec = spec or {}
        self.group = uuid.uuid4().hex[:8]
        #: Called (under the server lock) after every applied step, before its reply leaves:
        #: ``serve`` checkpoints here, so a restart never loses a step a client saw answered.
        self.on_applied: Callable[[], None] | None = None
        self._last_step: dict[tuple[str, str], int] = {}
        self._in_flight: set[tuple[tuple[str, str], tuple[str, int]]] = set()

    # ------------------------------------------------------------------ entry point
    def handle(self, message: Message) -> Message:
        """Answer one request. Never raises for bad input: returns an ERROR reply instead."""
        try:
            reply = self._handle_once(message)
        except (FrameError, CodecError, ProtocolError, ConfigError) as exc:
            reply = self._refuse(message, "INVALID_ARGUMENT", exc)
        except TrainingDiverged as exc:
            reply = self._refuse(message, "FAILED_PRECONDITION", exc)
            reply.meta["diverged"] = True
        except TimeoutError as exc:
            reply = self._refuse(message, "DEADLINE_EXCEEDED", exc)
        except (RuntimeError, ValueError, TypeError, IndexError, RecursionError) as exc:
            # what torch or int() raise for input that passed the frame checks but does not fit
            # this model (wrong width, class id out of range, malformed meta): the peer's fault
            reply = self._refuse(
                message, "INVALID_ARGUMENT", f"{type(exc).__name__}: {exc}".splitlines()[0]
            )
        with self._cond:
            stats = self.stats[message.client]
            stats.bytes_in += message.tensor_bytes()
            stats.bytes_out += reply.tensor_bytes()
            stats.last_seen = time.time()
        return reply

    def _refuse(self, message: Message, code: str, exc: Exception | str) -> Message:
        with self._cond:
            self.stats[message.client].errors += 1
        log.warning(
            "refused %s from %s step %d: %s", message.kind, message.client, message.step, exc
        )
        return error_message(message, code, str(exc))

    def _handle_once(self, message: Message) -> Message:
        """Apply a mutating request exactly once.

        The whole dispatch runs under the server lock (the segment is trained under it anyway;
        barrier waits release it), so a reply's record, the step counters and the saved state
        always agree. A duplicate that arrives while its original is still waiting at a barrier
        waits for the original's record instead of applying the step again.
        """
        if message.kind not in _RECORDED or (
            self.config == "ushape" and message.kind == Kind.FORWARD
        ):
            return self._dispatch(message)  # applies nothing: safe to repeat
        session_key = (message.session, message.client)
        key = (message.kind, message.step)
        flight = (session_key, key)
        with self._cond:
            while True:
                records = self._records[session_key]
                if key in records:
                    self.stats[message.client].repeats += 1
                    return records[key]
                if flight not in self._in_flight:
                    break
                self._cond.wait(self.wait_timeout)
            last = self._last_step.get(session_key, -1)
            if message.step < last:
                raise ProtocolError(
                    f"step {message.step} is older than the last applied step {last}; "
                    "steps must increase within a session"
                )
            self._in_flight.add(flight)
            try:
                reply = self._dispatch(message)
                if reply.kind != Kind.ERROR:
                    records[key] = reply
                    self._last_step[session_key] = max(last, message.step)
                    while len(records) > _RECORDS_PER_CLIENT:
                        records.popitem(last=False)
                    while len(self._records) > _MAX_SESSIONS:
                        oldest = next(iter(self._records))
                        self._records.pop(oldest)
                        self._last_step.pop(oldest, None)
                    if self.on_applied is not None:
                        self.on_applied()
            finally:
                self._in_flight.discard(flight)
                self._cond.notify_all()
        return reply

    def _dispatch(self, message: Message) -> Message:
        handlers = {
            Kind.HELLO: self._hello,
            Kind.FORWARD: self._forward,
            Kind.PREDICT: self._predict,
            Kind.MIDDLE_GRAD: self._middle_grad,
            Kind.WEIGHTS: self._weights,
            Kind.BYE: self._bye,
            Kind.STATUS: lambda m: Message(
                Kind.STATUS, m.session, m.client, m.step, meta=self.status()
            ),
        }
        handler = handlers.get(message.kind)
        if handler is None:
            raise ProtocolError(
                f"server does not accept {message.kind!r} messages; "
                f"expected one of {', '.join(sorted(handlers))}"
            )
        return handler(message)

    # ------------------------------------------------------------------ messages
    def _hello(self, message: Message) -> Message:
        claimed = message.meta.get("run_id")
        if self.run_id and claimed and claimed != self.run_id:
            raise ProtocolError(
                f"this bundle comes from training run {claimed}, but this server holds the "
                f"layers of run {self.run_id}: export the bundle from the checkpoint this server "
                "runs (or serve the bundle's own .server directory)"
            )
        last = self._last_step.get((message.session, message.client), -1)
        return Message(
            Kind.WELCOME,
            message.session,
            message.client,
            message.step,
            meta={
                "config": self.config,
                "resume_step": last + 1,
                "codec": (
                    self.controller.codec_for(message.client)
                    if self.controller
                    else self.act_codec.codec.spec
                ),
                "grad_codec": self.grad_codec.codec.spec,
                "spec": self.spec,
                "group": self.group,
                "run_id": self.run_id,
            },
        )

    def set_limits(self, limits: FrameLimits) -> None:
        """Change what one received frame may claim (``serve --max-tensor-mib``)."""
        self.limits = self.act_codec.limits = self.grad_codec.limits = limits

    def _bye(self, message: Message) -> Message:
        """The client is done with this session: forget its records."""
        with self._cond:
            self._records.pop((message.session, message.client), None)
            self._last_step.pop((message.session, message.client), None)
        return Message(Kind.ACK, message.session, message.client, message.step)

    def _forward(self, message: Message) -> Message:
        if self.config == "vertical":
            return self._vertical(message, train=True)
        act = self._decode_act(message)
        if self.config == "ushape":
            if "labels" in message.tensors:
                raise ProtocolError("ushape clients keep their labels: do not send 'labels'")
            return self._ushape_forward(message, act)
        labels = self._labels(message, len(act))
        want_grad = message.meta.get("want_grad", True) is not False
        ref = self._reference(message, act)  # checked before anything is applied
        with self._cond:
            act.requires_grad_(want_grad)
            self.segment.train()
            logits = self.segment(act)
            loss = self.loss_fn(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._check_finite(message.step, loss)
            # encode before stepping: the codec refuses a non-finite gradient, and then nothing
            # may have been applied
            grad = act.grad if act.grad is None else self.defense.server_grad(act.grad, labels)
            tensors = {"grad": self._encode_grad(message.step, grad)} if want_grad else {}
            self.optimizer.step()
            self.steps_applied += 1
        meta = self._count(message.client, len(act), loss, logits, labels)
        if ref is not None:
            switch = self._probe(message, act.detach(), ref, labels)
            if switch is not None:
                meta["codec"] = switch["to"]  # the client sends with this from its next step
        return Message(
            Kind.GRADIENT,
            message.session,
            message.client,
            message.step,
            tensors,
            meta,
        )

    def _predict(self, message: Message) -> Message:
        if self.config == "vertical":
            return self._vertical(message, train=False)
        act = self._decode_act(message)
        with self._cond, torch.no_grad():
            self.segment.eval()
            out = self.segment(act)
        ref = self._reference(message, act)
        if ref is not None:
            labels = self._labels(message, len(act)) if "labels" in message.tensors else None
            self._probe(message, act, ref, labels)
        if self.config == "ushape":
            return Message(
                Kind.MIDDLE,
                message.session,
                message.client,
                message.step,
                {"mid": self.mid_codec.encode(out)},
            )
        return self._prediction(message, out)

    def _prediction(self, message: Message, logits: torch.Tensor) -> Message:
        # class ids travel in the smallest integer type that holds them, like labels
        pred = logits.argmax(1).numpy().astype(label_dtype(logits.shape[1]))
        meta: dict[str, Any] = {"n": len(pred)}
        if "labels" in message.tensors:
            labels = decode_labels(message.tensors["labels"], self.limits)
            meta["correct"] = int((torch.from_numpy(pred) == labels).sum())
            meta["loss"] = float(self.loss_fn(logits, labels))
        return Message(
            Kind.PREDICTION,
            message.session,
            message.client,
            message.step,
            {"pred": encode_frame(pred, "fp32")},
            meta,
        )

    def _ushape_forward(self, message: Message, act: torch.Tensor) -> Message:
        with self._cond:
            act.requires_grad_(True)
            self.segment.train()
            mid = self.segment(act)
            self._ushape_graphs[(message.session, message.client, message.step)] = (act, mid)
            # a client that vanished must not pin its graphs forever
            while len(self._ushape_graphs) > 256:
                self._ushape_graphs.pop(next(iter(self._ushape_graphs)))
        self.stats[message.client].samples += len(act)
        return Message(
            Kind.MIDDLE,
            message.session,
            message.client,
            message.step,
            {"mid": self.mid_codec.encode(mid)},
        )

    def _middle_grad(self, message: Message) -> Message:
        if self.config != "ushape":
            raise ProtocolError(
                f"{Kind.MIDDLE_GRAD} is only valid in ushape, server runs {self.config}"
            )
        with self._cond:
            graph = self._ushape_graphs.pop((message.session, message.client, message.step), None)
        if graph is None:
            raise ProtocolError(
                f"no ushape forward pending for step {message.step}; send FORWARD first"
            )
        act, mid = graph
        grad = self.grad_codec.decode(message.frame("grad"))
        if grad.shape != mid.shape:
            raise ProtocolError(
                f"grad shape {tuple(grad.shape)} does not match middle output "
                f"shape {tuple(mid.shape)}"
            )
        with self._cond:
            self.optimizer.zero_grad(set_to_none=True)
            mid.backward(grad)
            self._check_finite(message.step, None, act.grad)
            self.optimizer.step()
            self.steps_applied += 1
        self.stats[message.client].steps += 1
        return Message(
            Kind.GRADIENT,
            message.session,
            message.client,
            message.step,
            {"grad": self._encode_grad(message.step, act.grad)},
        )

    def _vertical(self, message: Message, *, train: bool) -> Message:
        party = int(message.meta.get("party", -1))
        parties = int(message.meta.get("parties", 0))
        if not 0 <= party < parties:
            raise ProtocolError(
                f"vertical messages need meta party in [0, parties), "
                f"got party={party} parties={parties}"
            )
        act = self._decode_act(message)
        labels = (
            decode_labels(message.tensors["labels"], self.limits)
            if "labels" in message.tensors
            else None
        )
        key = (f"{message.kind}:{message.meta.get('group', '')}", message.step)

        def compute(parts: dict[int, Any]) -> dict[int, Message]:
            order = sorted(parts)
            acts = [parts[k][0] for k in order]
            if len({parts[k][2] for k in order}) > 1:
                raise ProtocolError(
                    f"vertical parties sent different samples for step {message.step} (sample "
                    "id digests differ): join the parties' data by sample id first"
                )
            label_list = [parts[k][1] for k in order if parts[k][1] is not None]
            if train and not label_list:
                raise ProtocolError("no party sent labels for this vertical step")
            if len({len(a) for a in acts}) != 1:
                raise ProtocolError(f"parties sent different batch sizes {[len(a) for a in acts]}")
            for a in acts:
                a.requires_grad_(train)
            joined = torch.cat([a.flatten(1) for a in acts], dim=1)
            if train:
                self.segment.train()
                logits = self.segment(joined)
                loss = self.loss_fn(logits, label_list[0])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self._check_finite(message.step, loss, *(a.grad for a in acts))
                self.optimizer.step()
                self.steps_applied += 1
                meta = self._count(message.client, len(joined), loss, logits, label_list[0])
                labels = label_list[0]
                return {
                    k: Message(
                        Kind.GRADIENT,
                        "",
                        "",
                        0,
                        # a frozen party (an exported edge segment) applies nothing: no grad
                        {"grad": self.grad_codec.encode(self._returned_grad(parts[k], labels))}
                        if parts[k][3]
                        else {},
                        meta,
                    )
                    for k in order
                }
            with torch.no_grad():
                self.segment.eval()
                logits = self.segment(joined)
            return {k: self._prediction(Message(Kind.PREDICT), logits) for k in order}

        ids = message.meta.get("ids")
        want_grad = message.meta.get("want_grad", True) is not False
        reply = self._barriers.meet(key, parties, party, (act, labels, ids, want_grad), compute)
        return Message(
            reply.kind,
            message.session,
            message.client,
            message.step,
            reply.tensors,
            dict(reply.meta),
        )

    def _weights(self, message: Message) -> Message:
        mode = message.meta.get("mode")
        if mode == "put":  # SplitNN hand-off: keep the lower weights for the next client
            with self._cond:
                self._handoff = dict(message.tensors)
                self.handoffs += 1
                self._cond.notify_all()
            return Message(Kind.ACK, message.session, message.client, message.step)
        if mode == "get":  # wait for this client's turn: the hand-offs before it are done
            turn = int(message.meta.get("turn", 0))
            with self._cond:
                if not self._cond.wait_for(lambda: self.handoffs >= turn, self.wait_timeout):
                    raise TimeoutError(
                        f"turn {turn} did not come within {self.wait_timeout:.0f}s "
                        f"({self.handoffs} hand-offs so far)"
                    )
                if self.handoffs > turn:
                    # turn t is served right after the t-th hand-off; more means these turns
                    # belong to a run this server has already finished
                    raise ProtocolError(
                        f"turn {turn} was already taken ({self.handoffs} hand-offs done): this "
                        "server finished an earlier run; start a fresh `edgesplit serve` (or a "
                        "fresh --state) for a new networked training run"
                    )
                tensors = dict(self._handoff or {})
            return Message(Kind.WEIGHTS, message.session, message.client, message.step, tensors)
        if mode == "average":  # splitfed: FedAvg over every client of the round
            clients = int(message.meta.get("clients", 0))
            rnd = int(message.meta.get("round", -1))
            weight = float(message.meta.get("n_samples", 1))
            arrays = {
                name: decode_frame(frame, self.limits) for name, frame in message.tensors.items()
            }

            def average(parts: dict[int, Any]) -> dict[int, Message]:
                total = sum(w for w, _ in parts.values())
                names = next(iter(parts.values()))[1].keys()
                for _, arrs in parts.values():
                    if arrs.keys() != names:
                        raise ProtocolError("FedAvg participants sent different parameter names")
                avg = {
                    n: sum(w * arrs[n].astype(np.float64) for w, arrs in parts.values()) / total
                    for n in names
                }
                tensors = {n: encode_frame(a.astype(np.float32), "fp32") for n, a in avg.items()}
                return {k: Message(Kind.WEIGHTS, "", "", 0, tensors) for k in parts}

            index = int(message.meta.get("index", -1))
            reply = self._barriers.meet(
                (f"avg:{message.meta.get('group', '')}", rnd),
                clients,
                index,
                (weight, arrays),
                average,
            )
            return Message(
                Kind.WEIGHTS, message.session, message.client, message.step, reply.tensors
            )
        raise ProtocolError(f"weights message needs meta mode put|get|average, got {mode!r}")

    # ------------------------------------------------------------------ helpers
    def _encode_grad(self, step: int, grad: torch.Tensor | None) -> bytes:
        """The cut gradient as a frame; a non-finite gradient means training diverged."""
        if grad is None:
            raise ProtocolError("no gradient reached the cut: the server segment ignores its input")
        try:
            return self.grad_codec.encode(grad)
        except CodecError as exc:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"training diverged at step {step}: {exc}; lower --lr, or "
                "use a finer codec for this cut"
            ) from None

    def _check_finite(
        self, step: int, loss: torch.Tensor | None, *grads: torch.Tensor | None
    ) -> None:
        """Refuse to apply a step whose loss or cut gradients are not finite: training diverged
        (too high a learning rate, or a codec too coarse for this cut). Nothing is updated.
        (Parameter gradients are not scanned: that would cost a pass over every weight.)"""
        bad = loss is not None and not bool(torch.isfinite(loss))
        bad = bad or any(g is not None and not bool(torch.isfinite(g).all()) for g in grads)
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            value = "nan" if loss is None else f"{float(loss.detach()):.4g}"
            raise TrainingDiverged(
                f"training diverged at step {step} (loss {value}, non-finite gradients); "
                "lower --lr, or use a finer codec for this cut"
            )

    def _returned_grad(self, part: tuple[Any, ...], labels: torch.Tensor) -> torch.Tensor:
        """A vertical party's cut gradient; a party without labels gets it through the
        label-leak defense (the label holder already knows its labels)."""
        act, own_labels = part[0], part[1]
        return act.grad if own_labels is not None else self.defense.server_grad(act.grad, labels)

    def _client_models(self, message: Message) -> ModelTable:
        """The entropy models of ``message.client``, plus the one the message carries."""
        with self._cond:
            table = self._models.setdefault(message.client, ModelTable())
        if "emodel" in message.tensors:
            freqs = decode_frame(message.tensors["emodel"], self.limits)
            if freqs.dtype != np.uint16 or freqs.ndim != 2:
                raise ProtocolError(
                    f"emodel must be a 2-D uint16 frequency table, got {freqs.dtype} "
                    f"{tuple(freqs.shape)}"
                )
            model = EntropyModel(freqs)  # validates sizes and values
            with self._cond:
                table.add(model)
        return table

    def _decode_act(self, message: Message) -> torch.Tensor:
        with use_models(self._client_models(message)):
            act = self.act_codec.decode(message.frame("act"))
        if act.ndim < 2 or len(act) == 0:
            raise ProtocolError(
                f"activation frame must be a non-empty batch, got {tuple(act.shape)}"
            )
        return act

    def _labels(self, message: Message, batch: int) -> torch.Tensor:
        labels = decode_labels(message.frame("labels"), self.limits)
        if labels.shape != (batch,):
            raise ProtocolError(
                f"labels shape {tuple(labels.shape)} does not match the batch "
                f"of {batch} activations"
            )
        return labels

    def _count(
        self, client: str, n: int, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, Any]:
        """Add a trained step to ``client``'s counters; returns the reply meta of that step:
        the loss to 4 significant digits (for the client's progress, not its training) and the
        correct count (the client knows its batch size, so ``n`` is not repeated)."""
        value = float(loss.detach())
        correct = int((logits.argmax(1) == labels).sum())
        stats = self.stats[client]
        stats.steps += 1
        stats.samples += n
        stats.labelled += n
        stats.loss_sum += value * n
        stats.correct += correct
        return {"loss": float(f"{value:.4g}"), "correct": correct}

    def _reference(self, message: Message, act: torch.Tensor) -> torch.Tensor | None:
        """The probe's fp32 copy of ``act``, decoded and checked; None when not a probe."""
        if "act_ref" not in message.tensors:
            return None
        ref = self.act_codec.decode(message.tensors["act_ref"])
        if ref.shape != act.shape:
            raise ProtocolError(f"act_ref shape {tuple(ref.shape)} != act {tuple(act.shape)}")
        return ref

    def _probe(
        self, message: Message, act: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor | None
    ) -> dict[str, Any] | None:
        """Compare the decoded batch with the same batch sent at fp32: what compression costs,
        for this client over the interval since its previous probe. With a bitrate controller,
        returns the codec switch this probe caused (also logged in the record), else ``None``."""
        with self._cond:
            costs = compare(self.segment, act, ref, labels, logits=self.config != "ushape")
            stats = self.stats[message.client]
            record: dict[str, Any] = {
                "time": time.time(),
                "client": message.client,
                "step": message.step,
                "n": len(act),
                **costs,
                "bytes_act": len(message.tensors["act"]),
                "bytes_act_fp32": fp32_frame_size(tuple(act.shape)),
                "interval_steps": stats.steps - stats.probe_steps,
                "interval_bytes_in": stats.bytes_in - stats.probe_bytes_in,
            }
            stats.probe_steps, stats.probe_bytes_in = stats.steps, stats.bytes_in
            switch = self.controller.observe(message.client, record) if self.controller else None
            if switch is not None:
                record["switch"] = switch
                log.info("client %s: codec %s -> %s (%s)", message.client, switch["from"],
                         switch["to"], switch["why"])
            self.probes.append(record)
            self.latest_probe[message.client] = record
        if self.on_probe:
            self.on_probe(record)
        return switch

    def export_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(tensors for ``torch.save``, JSON-able counters): everything a restart needs so that
        no applied step is lost and a retried step is still answered from the record."""
        with self._cond:
            tensors = {
                "segment": self.segment.state_dict(),
                "optimizer": self.optimizer.state_dict(),
            }
            last = {f"{s}\t{c}": step for (s, c), step in self._last_step.items()}
            records = {
                f"{s}\t{c}": [
                    {"request_kind": kind, "request_step": step, **message_to_dict(reply)}
                    for (kind, step), reply in list(recs.items())[-2:]
                ]
                for (s, c), recs in self._records.items()
            }
            meta = {
                "steps_applied": self.steps_applied,
                "handoffs": self.handoffs,
                "group": self.group,
                "last_step": last,
                "records": records,
                "handoff": {
                    n: base64.b64encode(f).decode() for n, f in (self._handoff or {}).items()
                },
                "stats": {name: asdict(st) for name, st in self.stats.items()},
            }
        return tensors, meta

    def import_state(self, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
        """Restore what :meth:`export_state` saved."""
        with self._cond:
            self.segment.load_state_dict(tensors["segment"])
            self.optimizer.load_state_dict(tensors["optimizer"])
            self.steps_applied = int(meta["steps_applied"])
            self.handoffs = int(meta["handoffs"])
            self.group = str(meta["group"])
            self._last_step = {
                tuple(k.split("\t", 1)): int(v)
                for k, v in meta["last_step"].items()
            }
            for key, items in meta["records"].items():
                session, client = key.split("\t", 1)
                recs = self._records[(session, client)]
                for item in items:
                    key_ = (item["request_kind"], int(item["request_step"]))
                    recs[key_] = message_from_dict(item)
            self._handoff = {n: base64.b64decode(f) for n, f in meta["handoff"].items()} or None
            for name, st in meta["stats"].items():
                self.stats[name] = ClientStats(**st)

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot: per client counters and the latest probe."""
        with self._cond:   # gRPC threads add clients and probes while we read
            return {
                "config": self.config,
                "steps_applied": self.steps_applied,
                "clients": {name: s.row() for name, s in sorted(self.stats.items())},
                "last_probe": self.probes[-1] if self.probes else None,
                "probes": dict(sorted(self.latest_probe.items())),
            }
