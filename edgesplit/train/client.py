"""Client roles: the part of split learning that runs where the data is.

A client holds its lower segment (and, in ushape, the head and the labels), talks to the server
only through a :class:`~edgesplit.transport.base.Transport`, and counts the bytes of every frame
it sends and receives next to what the same tensors would cost at fp32.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from edgesplit.errors import ProtocolError, TrainingDiverged
from edgesplit.split.bottleneck import param_groups, rate_loss
from edgesplit.split.defense import Defense
from edgesplit.train.frames import TensorCodec, decode_labels, encode_labels
from edgesplit.train.server_rules import NO_PENDING_FORWARD
from edgesplit.train.spec import ClientBytes
from edgesplit.transport.base import Transport
from edgesplit.transport.envelope import wire_size
from edgesplit.wire.frame import decode_frame, encode_frame, fp32_frame_size
from edgesplit.wire.labels import PACKED_LABELS, pack_labels
from edgesplit.wire.messages import Kind, Message, expect, ids_digest


def _resize_cost(message: Message, lengths: dict[str, int]) -> int:
    """Bytes ``message``'s envelope would gain (or lose) if the named tensors had these lengths:
    the reference of a ratio is the same envelope with fp32 frames (length prefixes included)."""
    if not lengths:
        return 0
    resized = replace(
        message,
        tensors={n: bytes(lengths[n]) if n in lengths else f for n, f in message.tensors.items()},
    )
    return wire_size(resized) - wire_size(message)


#: How many times one ushape step sends its FORWARD again after the server lost it.
USHAPE_FORWARD_RESENDS = 3


def _forward_lost(reply: Message) -> bool:
    """``reply`` refuses a ushape MIDDLE_GRAD because the server holds no pending forward for
    its step (it restarted between FORWARD and MIDDLE_GRAD, say). The server gives this
    refusal only for a step it has not applied: an applied one is answered from its record, or
    refused as already applied."""
    return (
        reply.kind == Kind.ERROR
        and reply.meta.get("code") == "FAILED_PRECONDITION"
        and str(reply.meta.get("message", "")).startswith(NO_PENDING_FORWARD)
    )


@dataclass
class StepResult:
    loss: float
    correct: int
    n: int


def _reported(meta: dict[str, Any], batch: int) -> StepResult:
    """The server's report in a GRADIENT reply: mean loss and correct count over ``n`` samples
    (the steps since its previous report; ``n`` defaults to this batch), or nothing (``n = 0``)."""
    if "loss" not in meta:
        return StepResult(0.0, 0, 0)
    return StepResult(
        float(meta["loss"]), int(meta.get("correct", 0)), int(meta.get("n", batch))
    )


@dataclass
class SplitClient:
    """Client of vanilla, splitfed and vertical training (and of ushape with ``head`` set).

    Parameters
    ----------
    name: the client's name (its token name on a real server).
    lower: the client's bottom segment, trained from the gradients the server returns.
    transport: how requests reach the server.
    codec, grad_codec: activations up (and ushape middle outputs down) / gradients.
    num_classes: decides the integer type labels travel in.
    head: ushape only — the client's last layers; labels then never leave the client.
    party, parties, group: vertical only — this party's index, the party count and the id that
        groups the parties of one run on the server.
    send_labels: vanilla/splitfed/vertical label holder sends labels with its activations.
    packed_labels: send them as bare packed class ids (tensor ``y``, no frame header: the
        server knows the class count and the batch) — set when the server offers it.
    measure_snr: decode a private copy of each activation frame to measure distortion.
    """

    name: str
    lower: nn.Module
    transport: Transport
    codec: str = "fp32"
    grad_codec: str = "fp32"
    num_classes: int = 2
    lr: float = 0.05
    momentum: float = 0.9
    head: nn.Module | None = None
    party: int | None = None
    parties: int | None = None
    group: str = ""
    send_labels: bool = True
    packed_labels: bool = False
    measure_snr: bool = True
    #: Per-sample cut shape without the bottleneck: fp32 reference counts use it (``None``:
    #: the shape of what is sent).
    reference_shape: tuple[int, ...] | None = None
    #: Privacy defenses; the client's part is its backward (NoPeek's extra loss term).
    defense: Defense = field(default_factory=Defense)
    session: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    step: int = 0
    traffic: ClientBytes = field(init=False)

    def __post_init__(self) -> None:
        self.traffic = ClientBytes(self.name)
        self.act = TensorCodec.from_spec(self.codec, measure_snr=self.measure_snr)
        self.grad = TensorCodec.from_spec(self.grad_codec, measure_snr=False)
        groups = param_groups(self.lower, self.lr)
        if self.head is not None:
            groups += param_groups(self.head, self.lr)
        self.optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum)
        #: An entropy model fitted here that the server has not received yet (a raw frame).
        self.pending_model: bytes | None = None
        self._last_down = 0  # wire bytes of the last reply
        self.loss_fn = nn.CrossEntropyLoss()

    # ------------------------------------------------------------------ protocol plumbing
    def _meta(self, **extra: Any) -> dict[str, Any]:
        meta: dict[str, Any] = dict(extra)
        # the run's group id matters only where the server meets several clients at a barrier
        # (vertical steps, FedAvg rounds); elsewhere it would cost bytes every step
        if self.group and (self.party is not None or extra.get("mode") == "average"):
            meta["group"] = self.group
        if self.party is not None:
            meta.update(party=self.party, parties=self.parties)
        return meta

    def _send(
        self,
        kind: str,
        tensors: dict[str, bytes],
        fp32: dict[str, int] | None = None,
        *,
        count: bool = True,
        **meta: Any,
    ) -> Message:
        """Send one request; count its wire bytes, and (``fp32``: tensor name -> length of the
        fp32 reference frame) what the same request would cost at fp32."""
        message = Message(kind, self.session, self.name, self.step, tensors, self._meta(**meta))
        up0, down0 = self.transport.wire_bytes_up, self.transport.wire_bytes_down
        reply = self.transport.request(message)
        up = self.transport.wire_bytes_up - up0
        self._last_down = down = self.transport.wire_bytes_down - down0
        if kind == Kind.WEIGHTS:
            self.traffic.weights_up += up
            self.traffic.weights_down += down
        elif count:
            self.traffic.bytes_up += up
            self.traffic.envelope_up += up - message.tensor_bytes()
            self.traffic.bytes_up_fp32 += up + _resize_cost(message, fp32 or {})
            self.traffic.bytes_down += down
            self.traffic.envelope_down += down - reply.tensor_bytes()
        return reply

    def _count_down_fp32(self, reply: Message, name: str, shape: tuple[int, ...]) -> None:
        """The reply just received, with its tensor ``name`` as an fp32 frame of ``shape``."""
        self.traffic.bytes_down_fp32 += self._last_down + _resize_cost(
            reply, {name: fp32_frame_size(shape)}
        )

    # ------------------------------------------------------------------ training
    def train_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None,
        ids: np.ndarray | None = None,
        *,
        report: bool = True,
    ) -> StepResult:
        """One step: forward the lower segment, exchange with the server, apply the gradient.

        ``report``: ask the server for the loss and correct count of this session's steps since
        its last report (a trainer asks once an epoch: per step they would cost the down-link
        a byte a sample at 100×). Steps without a report return ``n = 0``."""
        self.step += 1
        self.lower.train()
        act = self.lower(x)
        if not bool(torch.isfinite(act).all()):
            # a result, not a crash: the codec would refuse it, and a sweep must go on
            raise TrainingDiverged(
                f"training diverged at step {self.step}: the client's cut activations are not "
                "finite; lower --lr or clip the cut (e.g. --defense noise:0:4)"
            )
        frame = self.act.encode(act, fit=True)
        tensors = self._with_model({"act": frame})
        fp32 = {"act": fp32_frame_size(self._reference(act))}
        if self.head is None and self.send_labels and y is not None:
            if self.packed_labels:
                tensors[PACKED_LABELS] = pack_labels(y.numpy(), self.num_classes)
            else:
                tensors["labels"] = encode_labels(y, self.num_classes)
        # a training step wants the cut gradient back: the protocol's default, not sent
        meta: dict[str, Any] = {"ids": ids_digest(ids)} if ids is not None else {}
        if report:
            meta["report"] = True
        reply = expect(
            self._send(Kind.FORWARD, tensors, fp32, **meta),
            Kind.GRADIENT,
            Kind.MIDDLE,
        )
        self.pending_model = None  # the server accepted the frame, so it holds the model
        if self.head is not None:

            def forward_again() -> Message:
                # the same request, byte for byte: same step, same frames (and entropy model)
                return expect(self._send(Kind.FORWARD, tensors, fp32, **meta), Kind.MIDDLE)

            return self._ushape_rest(x, act, y, reply, forward_again)
        grad = self.grad.decode(reply.frame("grad"))
        self._count_down_fp32(reply, "grad", self._reference(act))
        self._apply(x, act, grad)
        return _reported(reply.meta, len(x))

    def _reference(self, act: torch.Tensor) -> tuple[int, ...]:
        """Shape of the fp32 reference of ``act``: the cut without the bottleneck."""
        per_sample = self.reference_shape or tuple(act.shape[1:])
        return (len(act), *per_sample)

    def _with_model(self, tensors: dict[str, bytes]) -> dict[str, bytes]:
        """Attach the entropy model the server has not received yet (side information: sent
        once per model, with the first frame that uses it, and counted like every byte)."""
        if self.pending_model is not None:
            tensors["emodel"] = self.pending_model
        return tensors

    def refit_entropy_model(self) -> None:
        """End of an epoch: fit the activation codec's entropy model on this epoch's codes
        (``fq:B,ans`` only); the next FORWARD carries it to the server, then frames use it."""
        model = self.act.refit()
        if model is not None:
            self.pending_model = encode_frame(model.freqs, "fp32")

    def _ushape_rest(
        self,
        x: torch.Tensor,
        act: torch.Tensor,
        y: torch.Tensor | None,
        reply: Message,
        forward_again: Callable[[], Message],
    ) -> StepResult:
        """The rest of a ushape step: the head on the middle outputs in ``reply``, its loss,
        MIDDLE_GRAD, and the lower segment's backward.

        A MIDDLE_GRAD the server refuses because it no longer holds this step's forward (a
        restart between FORWARD and MIDDLE_GRAD; the server persists applied steps, not pending
        forwards) was not applied: ``forward_again`` sends the same FORWARD, and the head runs
        again on the new middle outputs. A server restored to the state it ran the first
        forward on returns the same outputs, so the step is exactly the one it would have been.
        """
        if y is None or self.head is None:
            raise ProtocolError("ushape training needs the client's labels and head")
        for resends in range(USHAPE_FORWARD_RESENDS + 1):
            mid = self.act.decode(reply.frame("mid")).requires_grad_(True)
            self._count_down_fp32(reply, "mid", tuple(mid.shape))
            self.head.train()
            logits = self.head(mid)
            loss = self.loss_fn(logits, y)
            if not bool(torch.isfinite(loss)):
                raise TrainingDiverged(
                    f"training diverged at step {self.step} (loss "
                    f"{float(loss.detach()):.4g}); lower --lr or use a finer codec"
                )
            # also drops the head's grads of an earlier attempt: they must not add up
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # fills the head's grads and mid.grad
            if mid.grad is None:
                raise ProtocolError(
                    "the head did not use the middle outputs: no gradient to return"
                )
            frame = self.grad.encode(mid.grad)
            answer = self._send(
                Kind.MIDDLE_GRAD, {"grad": frame}, {"grad": fp32_frame_size(tuple(mid.shape))}
            )
            if not _forward_lost(answer) or resends == USHAPE_FORWARD_RESENDS:
                break
            reply = forward_again()
        reply2 = expect(answer, Kind.GRADIENT)
        grad = self.grad.decode(reply2.frame("grad"))
        self._count_down_fp32(reply2, "grad", self._reference(act))
        self._backward(x, act, self._checked(grad, act))
        self.optimizer.step()
        correct = int((logits.argmax(1) == y).sum())
        return StepResult(float(loss.detach()), correct, len(y))

    def _checked(self, grad: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        if grad.shape != act.shape:
            raise ProtocolError(
                f"server gradient has shape {tuple(grad.shape)}, activations {tuple(act.shape)}"
            )
        return grad

    def _apply(self, x: torch.Tensor, act: torch.Tensor, grad: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._backward(x, act, self._checked(grad, act))
        self.optimizer.step()

    def _backward(self, x: torch.Tensor, act: torch.Tensor, grad: torch.Tensor) -> None:
        """``act.backward(grad)`` — straight-through: the codec has no gradient — plus the
        client's own loss terms: NoPeek's dCor (a defense) and the bottleneck's rate penalty."""
        candidates = (self.defense.client_loss(x, act), rate_loss(self.lower))
        terms = [t for t in candidates if t is not None]
        if not terms:
            act.backward(grad)
            return
        extra = torch.stack(terms).sum()
        torch.autograd.backward([act, extra], [grad, torch.ones_like(extra)])

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> np.ndarray:
        """Class ids for ``x``, through the codec and the server (not counted as training bytes)."""
        self.step += 1
        self.lower.eval()
        act = self.lower(x)
        tensors = self._with_model({"act": self.act.encode(act)})
        reply = expect(
            self._send(Kind.PREDICT, tensors, count=False), Kind.PREDICTION, Kind.MIDDLE
        )
        self.pending_model = None
        if self.head is None:
            return decode_labels(reply.frame("pred")).numpy()
        self.head.eval()
        mid = self.act.decode(reply.frame("mid"))
        return self.head(mid).argmax(1).numpy()

    # ------------------------------------------------------------------ weights
    def weights_frames(self) -> dict[str, bytes]:
        """The lower segment's weights as fp32 frames. (A ushape head is never included: the
        last layers never leave the client.)"""
        return {
            name: encode_frame(t.detach().numpy(), "fp32")
            for name, t in self.lower.state_dict().items()
        }

    def load_weights_frames(self, frames: dict[str, bytes]) -> None:
        state = self.lower.state_dict()
        if set(frames) != set(state):
            raise ProtocolError(f"weights carry {sorted(frames)}, this segment has {sorted(state)}")
        self.lower.load_state_dict(
            {n: torch.from_numpy(decode_frame(f).copy()) for n, f in frames.items()}
        )

    def hand_off(self) -> None:
        """Vanilla: leave this client's lower weights with the server for the next client."""
        self.step += 1
        expect(self._send(Kind.WEIGHTS, self.weights_frames(), mode="put"), Kind.ACK)

    def take_over(self, turn: int) -> None:
        """Vanilla/ushape: wait for turn ``turn`` (the server counts hand-offs), then start from
        the weights the previous client left with the server."""
        self.step += 1
        reply = expect(self._send(Kind.WEIGHTS, {}, mode="get", turn=turn), Kind.WEIGHTS)
        if reply.tensors:
            self.load_weights_frames(dict(reply.tensors))

    def federated_average(self, round_: int, index: int, clients: int, n_samples: int) -> None:
        """Splitfed: send the lower weights, get back the FedAvg of every client's."""
        self.step += 1
        reply = expect(
            self._send(
                Kind.WEIGHTS,
                self.weights_frames(),
                mode="average",
                round=round_,
                index=index,
                clients=clients,
                n_samples=n_samples,
            ),
            Kind.WEIGHTS,
        )
        self.load_weights_frames(dict(reply.tensors))
