"""One object per configuration: how the server applies FORWARD, PREDICT and MIDDLE_GRAD.

Each step runs in two phases. :meth:`StepRules.prepare` decodes and checks what the peer sent;
it runs outside the server lock and changes nothing. :meth:`StepRules.apply` runs under the lock,
in the same critical section that records the reply, so the step counters, the record and a
checkpoint taken right after always agree.

* :class:`VanillaRules` (``vanilla``) and :class:`SplitFedRules` (``splitfed``): the server
  holds the upper layers and the labels' loss.
* :class:`UShapeRules`: the server holds the middle; a FORWARD keeps its graph until the
  client's MIDDLE_GRAD. Each pending forward runs on its own snapshot of the weights, so two
  sessions may interleave (a step of one does not invalidate the other's graph); the other's
  gradient is then one step stale, as in asynchronous SGD.
* :class:`VerticalRules`: parties of one step meet at a barrier; the last to arrive runs the
  concatenated step for all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from edgesplit.errors import ProtocolError
from edgesplit.train.server_checks import (
    InternalFault,
    PreconditionFailed,
    meta_flag,
    meta_int,
)
from edgesplit.train.server_drift import Verdict
from edgesplit.train.server_records import Session
from edgesplit.wire.messages import Kind, Message

if TYPE_CHECKING:
    from edgesplit.train.server import SplitServer


@dataclass
class Batch:
    """A decoded, checked request: activations, optional labels and probe copy."""

    act: torch.Tensor
    labels: torch.Tensor | None = None
    ref: torch.Tensor | None = None
    want_grad: bool = True
    extra: Any = None
    #: The activations against the training reference (``None``: the server has no guard).
    drift: Verdict | None = None
    #: Who sent it (vertical: the barrier's computation screens every party's batch).
    client: str = ""


#: How a ushape MIDDLE_GRAD without its pending FORWARD is refused (``FAILED_PRECONDITION``;
#: docs/protocol.md quotes it). Nothing was applied: the torch client then sends the same
#: FORWARD again and redoes its head (:meth:`SplitClient._ushape_rest`).
NO_PENDING_FORWARD = "no ushape forward pending"


def _not_ushape(host: SplitServer) -> PreconditionFailed:
    return PreconditionFailed(
        f"{Kind.MIDDLE_GRAD} is only valid in ushape; this server runs {host.config}"
    )


class StepRules:
    """The step rules of one configuration (subclasses override what they accept)."""

    name: ClassVar[str] = ""
    #: The segment outputs logits (probes compare decisions; PREDICT answers class ids).
    logits: ClassVar[bool] = True
    #: FORWARD changes the weights (so it is recorded and never applied twice).
    forward_applies: ClassVar[bool] = True
    #: Several clients train in turn, handing the lower layers on (SplitNN's schedule): the
    #: run is over after ``epochs × clients`` hand-offs.
    turn_based: ClassVar[bool] = False
    #: Clients train in parallel and average their lower layers each round (FedAvg): steps
    #: are applied in a fixed order and the run is over after ``epochs`` rounds.
    federated: ClassVar[bool] = False

    def prepare(self, host: SplitServer, message: Message, session: Session | None) -> Batch:
        """Decode and check ``message`` (outside the lock; changes nothing)."""
        if message.kind == Kind.FORWARD:
            return self.prepare_forward(host, message, session)
        if message.kind == Kind.PREDICT:
            return self.prepare_predict(host, message, session)
        if message.kind == Kind.MIDDLE_GRAD:
            return self.prepare_middle_grad(host, message, session)
        raise ProtocolError(f"{self.name} step rules do not handle {message.kind!r}")

    def apply(
        self, host: SplitServer, message: Message, batch: Batch, session: Session | None
    ) -> Message:
        """Apply a prepared step (under the server lock)."""
        if message.kind == Kind.FORWARD:
            return self.apply_forward(host, message, batch, session)
        if message.kind == Kind.PREDICT:
            return self.apply_predict(host, message, batch, session)
        return self.apply_middle_grad(host, message, batch, session)

    # defaults -----------------------------------------------------------------
    def prepare_forward(
        self, host: SplitServer, message: Message, session: Session | None
    ) -> Batch:
        act = host.decode_act(message, session)
        labels = host.labels(message, len(act))
        return Batch(
            act,
            labels,
            host.reference(message, act),
            meta_flag(message, "want_grad", True),
            drift=host.check_drift(act),
        )

    def prepare_predict(
        self, host: SplitServer, message: Message, session: Session | None
    ) -> Batch:
        act = host.decode_act(message, session)
        return Batch(
            act,
            host.optional_labels(message, len(act)),
            host.reference(message, act),
            drift=host.check_drift(act),
        )

    def prepare_middle_grad(
        self, host: SplitServer, message: Message, session: Session | None
    ) -> Batch:
        raise _not_ushape(host)

    def apply_forward(
        self, host: SplitServer, message: Message, batch: Batch, session: Session | None
    ) -> Message:
        raise NotImplementedError

    def apply_predict(
        self, host: SplitServer, message: Message, batch: Batch, session: Session | None
    ) -> Message:
        drift = host.screen_drift(message, batch.drift, train=False)  # answered, flagged
        with torch.no_grad():
            host.segment.eval()
            out = host.run_segment(batch.act)
        if batch.labels is not None and self.logits:
            host.check_logits(batch.labels, out)
        if batch.ref is not None:
            host.probe(message, batch.act, batch.ref, batch.labels)
        return with_drift(host.prediction(message, out, batch.labels), drift)

    def apply_middle_grad(
        self, host: SplitServer, message: Message, batch: Batch, session: Session | None
    ) -> Message:
        raise _not_ushape(host)


class VanillaRules(StepRules):
    """``vanilla`` and ``splitfed``: the server's upper layers end in the loss."""

    name = "vanilla"
    turn_based = True

    def apply_forward(
        self, host: SplitServer, message: Message, batch: Batch, session: Session | None
    ) -> Message:
        act, labels = batch.act, batch.labels
        if labels is None:
            raise InternalFault("vanilla FORWARD reached apply without labels")
        host.check_classes(labels)
        # drifted activations are refused (policy refuse) before anything is applied
        drift = host.screen_drift(message, batch.drift, train=True)
        index = host.wait_turn(session)  # splitfed: steps in the round's fixed order
        act.requires_grad_(batch.want_grad)
        host.segment.train()
        logits = host.run_segment(act)
        host.check_logits(labels, logits)  # checked before anything is applied
        loss = host.loss_fn(logits, labels)
        host.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        host.check_finite(message.step, loss)
        # encode before stepping: the codec refuses a non-finite gradient, and then nothing may
        # have been applied
        grad = act.grad if act.grad is None else host.defense.server_grad(act.grad, labels)
        tensors = {"grad": host.encode_grad(message.step, grad)} if batch.want_grad else {}
        host.optimizer.step()
        host.steps_applied += 1
        host.stepped(index)
        meta = host.count(message.client, len(act), loss, logits, labels)
        if batch.ref is not None:
            switch = host.probe(message, act.detach(), batch.ref, labels)
            if switch is not None:
                meta["codec"] = switch["to"]  # the client sends with this from its next step
        reply = Message(Kind.GRADIENT, message.session, message.client, message.step, tensors, meta)
        return with_drift(reply, drift)


class SplitFedRules(VanillaRules):
    """``splitfed``: vanilla steps, clients in parallel, lower layers averaged each round."""

    name = "splitfed"
    turn_based = False
    federated = True


@dataclass
class _Pending:
    """A ushape forward waiting for its MIDDLE_GRAD: its graph and the weights it ran on."""

    act: torch.Tensor
    mid: torch.Tensor
    params: dict[str, torch.Tensor]


class UShapeRules(StepRules):
    """``ushape``: the server holds the middle; labels and logits stay on the client."""

    name = "ushape"
    turn_based = True
    logits = False
    forward_applies = False  # the step is applied by MIDDLE_GRAD

    def prepare_forward(
        self, host: SplitServer, message: Message, session: Session | None
    ) -> Batch:
        if "labels" in message.tensors or "y" in message.tensors:
            raise ProtocolError("ushape clients keep their labels: do not send 'labels' or 'y'")
        act = host.decode_act(message, session)
        return Batch(act, drift=host.check_drift(act))

    def apply_forward(
        self, host: SplitServer, message: Message, batch: Batch, session: Session | None
    ) -> Message:
        if session is None:
            raise ProtocolError("a ushape FORWARD needs a session")  # the server opens one
        # the step is applied by its MIDDLE_GRAD: a refused FORWARD leaves nothing pending
        drift = host.screen_drift(message, batch.drift, train=True)
        act = batch.act.requires_grad_(True)
        # the forward runs on a snapshot of the weights: another session's step (an in-place
        # optimizer update) would otherwise invalidate this graph before its MIDDLE_GRAD
        params = {
            n: p.detach().clone().requires_grad_(p.requires_grad)
            for n, p in host.segment.named_parameters()
        }
        saved = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[0] += t.numel() * t.element_size()
            return t

        host.segment.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mid = host.run_segment(act, params)
        nbytes = saved[0] + sum(t.numel() * t.element_size() for t in (act, mid, *params.values()))
        host.table.add_pending(session, message.step, _Pending(act, mid, params), nbytes)
        host.stats[message.client].samples += len(act)
        reply = Message(
            Kind.MIDDLE,
            message.session,
            message.client,
            message.step,
            {"mid": host.mid_codec.encode(mid)},
        )
        return with_drift(reply, drift)

    def prepare_middle_grad(
        self, host: SplitServer, message: Message, session: Session | None
    ) -> Batch:
        return Batch(host.grad_codec.decode(message.frame("grad")))

    def apply_middle_grad(
        self, host: SplitServer, message: Message, batch: Batch, session: Session | None
    ) -> Message:
        pending = None if session is None else host.table.peek_pending(session, message.step)
        if session is None or pending is None:
            raise PreconditionFailed(
                f"{NO_PENDING_FORWARD} for step {message.step} of this session; send "
                "FORWARD first"
            )
        if not isinstance(pending, _Pending):
            raise InternalFault(f"pending ushape forward is a {type(pending).__name__}")
        grad = batch.act
        if grad.shape != pending.mid.shape:
            # the forward stays pending: a corrected MIDDLE_GRAD may follow
            raise ProtocolError(
                f"grad shape {tuple(grad.shape)} does not match middle output "
                f"shape {tuple(pending.mid.shape)}"
            )
        host.table.take_pending(session, message.step)
        host.optimizer.zero_grad(set_to_none=True)
        pending.mid.backward(grad)
        host.check_finite(message.step, None, pending.act.grad)
        tensors = {"grad": host.encode_grad(message.step, pending.act.grad)}
        for name, p in host.segment.named_parameters():
            p.grad = pending.params[name].grad
        host.optimizer.step()
        host.steps_applied += 1
        host.stats[message.client].steps += 1
        return Message(Kind.GRADIENT, message.session, message.client, message.step, tensors)

    def apply_predict(
        self, host: SplitServer, message: Message, batch: Batch, session: Session | None
    ) -> Message:
        drift = host.screen_drift(message, batch.drift, train=False)
        with torch.no_grad():
            host.segment.eval()
            out = host.run_segment(batch.act)
        if batch.ref is not None:
            host.probe(message, batch.act, batch.ref, batch.labels)
        reply = Message(
            Kind.MIDDLE,
            message.session,
            message.client,
            message.step,
            {"mid": host.mid_codec.encode(out)},
        )
        return with_drift(reply, drift)


class VerticalRules(StepRules):
    """``vertical``: K parties send their cut outputs of the same samples; the server
    concatenates them, runs its upper layers and returns each party its slice."""

    name = "vertical"

    def _prepare(self, host: SplitServer, message: Message, session: Session | None) -> Batch:
        parties = meta_int(message, "parties", lo=1, hi=1024)
        expected = host.expected_clients()
        if expected is not None and parties != expected:
            raise PreconditionFailed(
                f"this vertical run has {expected} parties; the message says parties={parties}"
            )
        party = meta_int(message, "party", lo=0, hi=parties - 1)
        act = host.decode_act(message, session)
        labels = host.optional_labels(message, len(act))
        ids = message.meta.get("ids")
        if ids is not None and not isinstance(ids, str):
            raise ProtocolError("vertical meta 'ids' must be the sample ids' digest (a string)")
        want_grad = meta_flag(message, "want_grad", True)
        drift = host.check_drift(act, party)  # against this party's own reference
        return Batch(act, labels, None, want_grad, (party, parties, ids), drift, message.client)

    prepare_forward = _prepare
    prepare_predict = _prepare

    def apply_forward(
        self, host: SplitServer, message: Message, batch: Batch, session: Session | None
    ) -> Message:
        return self._meet(host, message, batch, train=True)

    def apply_predict(
        self, host: SplitServer, message: Message, batch: Batch, session: Session | None
    ) -> Message:
        return self._meet(host, message, batch, train=False)

    def _meet(self, host: SplitServer, message: Message, batch: Batch, *, train: bool) -> Message:
        party, parties, ids = batch.extra
        # a party's place cannot be taken by another client
        claimed = host.claim_index(party, message.client)
        group = message.meta.get("group", "")
        key = (f"{message.kind}:{group if isinstance(group, str) else ''}", message.step)
        step = message.step

        def compute(parts: dict[int, Batch]) -> dict[int, Message]:
            return host.guard(lambda: self._compute(host, message.client, step, parts, train))

        try:
            reply = host.barriers.meet(key, parties, party, batch, compute)
        except BaseException:
            if claimed:
                host.release_index(party)
            raise
        host.used_index(party)
        return Message(
            reply.kind,
            message.session,
            message.client,
            message.step,
            reply.tensors,
            dict(reply.meta),
        )

    def _compute(
        self, host: SplitServer, client: str, step: int, parts: dict[int, Batch], train: bool
    ) -> dict[int, Message]:
        order = sorted(parts)
        acts = [parts[k].act for k in order]
        if len({parts[k].extra[2] for k in order}) > 1:
            raise ProtocolError(
                f"vertical parties sent different samples for step {step} (sample "
                "id digests differ): join the parties' data by sample id first"
            )
        label_list = [parts[k].labels for k in order if parts[k].labels is not None]
        if train and not label_list:
            raise ProtocolError("no party sent labels for this vertical step")
        if len({len(a) for a in acts}) != 1:
            raise ProtocolError(f"parties sent different batch sizes {[len(a) for a in acts]}")
        # every party's activations against its reference, before anything is applied: a
        # refusal reaches every party of the step
        kind = Kind.FORWARD if train else Kind.PREDICT
        drift = {
            k: host.screen_drift(
                Message(kind, "", parts[k].client, step),
                parts[k].drift,
                train=train,
                party=k,
            )
            for k in order
        }
        for a in acts:
            a.requires_grad_(train)
        joined = torch.cat([a.flatten(1) for a in acts], dim=1)
        if not train:
            with torch.no_grad():
                host.segment.eval()
                logits = host.run_segment(joined)
            return {
                k: with_drift(host.prediction(Message(Kind.PREDICT), logits, None), drift[k])
                for k in order
            }
        labels = label_list[0]
        if labels is None:
            raise InternalFault("vertical labels vanished after the check")
        host.segment.train()
        logits = host.run_segment(joined)
        host.check_logits(labels, logits)
        loss = host.loss_fn(logits, labels)
        host.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        host.check_finite(step, loss, *(a.grad for a in acts))
        replies = {}
        for k in order:
            part = parts[k]
            grad = part.act.grad
            if part.labels is None and grad is not None:
                # a party without labels gets its gradient through the label-leak defense
                grad = host.defense.server_grad(grad, labels)
            # a frozen party (an exported edge segment) applies nothing: no grad
            tensors = {"grad": host.encode_grad(step, grad)} if part.want_grad else {}
            replies[k] = tensors
        host.optimizer.step()
        host.steps_applied += 1
        meta = host.count(client, len(joined), loss, logits, labels)
        return {
            k: with_drift(Message(Kind.GRADIENT, "", "", 0, replies[k], dict(meta)), drift[k])
            for k in order
        }


def with_drift(reply: Message, drift: dict[str, Any] | None) -> Message:
    """``reply`` carrying the ``drift`` record of its request's activations, if flagged."""
    if drift is not None:
        reply.meta["drift"] = drift
    return reply


#: The step rules of each configuration name.
RULES: dict[str, type[StepRules]] = {
    "vanilla": VanillaRules,
    "splitfed": SplitFedRules,
    "ushape": UShapeRules,
    "vertical": VerticalRules,
}


def rules_for(config: str) -> StepRules:
    """The step rules of ``config``.

    Raises
    ------
    ConfigError
        For an unknown configuration (the message lists the valid ones).
    """
    from edgesplit.errors import ConfigError

    try:
        return RULES[config]()
    except KeyError:
        raise ConfigError(
            f"unknown configuration {config!r}; expected one of {', '.join(sorted(RULES))}"
        ) from None
