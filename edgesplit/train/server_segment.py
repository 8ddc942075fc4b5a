"""What the step rules do with the server's segment and with what a peer sent: decode and check
the request's tensors, run the segment (a cut that does not fit is the peer's mistake, named),
refuse a diverged step before it is applied, encode the cut gradient, count, answer predictions,
measure probes. :class:`SegmentSteps` is mixed into :class:`~edgesplit.train.server.SplitServer`,
which owns the attributes it uses; everything that touches the shared weights runs under the
server lock (the rules call it from their apply phase), decoding outside it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from edgesplit.codecs.entropy import EntropyModel, ModelTable, use_models
from edgesplit.data import label_dtype
from edgesplit.errors import CodecError, ProtocolError, TrainingDiverged
from edgesplit.split.defense import Defense
from edgesplit.train.controller import BitrateController
from edgesplit.train.frames import TensorCodec, decode_labels
from edgesplit.train.server_checks import (
    InternalFault,
    PreconditionFailed,
    check_labels,
    codec_family,
    cut_mismatch,
    frame_family,
)
from edgesplit.train.server_drift import DriftGuard, Verdict
from edgesplit.train.server_probes import ProbeLog
from edgesplit.train.server_records import Session
from edgesplit.train.server_rules import StepRules
from edgesplit.train.server_state import ClientStats
from edgesplit.wire.frame import FrameLimits, decode_frame, encode_frame
from edgesplit.wire.labels import MAX_PACKED_CLASSES, PACKED_LABELS, unpack_labels
from edgesplit.wire.messages import Kind, Message


class SegmentSteps:
    """Segment and request helpers of the server (a mixin: the server sets these attributes)."""

    segment: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    defense: Defense
    act_codec: TensorCodec
    grad_codec: TensorCodec
    limits: FrameLimits
    spec: dict[str, Any]
    rules: StepRules
    stats: dict[str, ClientStats]
    _cond: threading.Condition
    _models: dict[str, ModelTable]
    _probes: ProbeLog
    _cut_shape: tuple[int, ...] | None
    _classes: int | None
    num_classes: int | None
    drift: DriftGuard | None

    @property
    def controller(self) -> BitrateController | None:
        """Moves each probing client along a ladder of codecs (``serve --ladder --max-drop``)."""
        return self._probes.controller

    @controller.setter
    def controller(self, value: BitrateController | None) -> None:
        self._probes.controller = value

    def run_segment(
        self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The server segment on ``x`` (with ``params`` instead of its own weights, if given).
        Activations the segment cannot take are the peer's mistake, refused with the shape
        expected; a failure on the shape accepted steps sent is the server's own."""
        shape = tuple(int(d) for d in x.shape[1:])
        try:
            if params is None:
                out = self.segment(x)
            else:
                out = torch.func.functional_call(self.segment, params, (x,))
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            if self._cut_shape is not None and shape == self._cut_shape:
                raise  # it took this shape before: not the peer's input
            raise cut_mismatch(self.segment, shape, self._cut_shape) from exc
        if self._cut_shape is None:
            self._cut_shape = shape
        return out

    def encode_grad(self, step: int, grad: torch.Tensor | None) -> bytes:
        """The cut gradient as a frame; a non-finite gradient means training diverged."""
        if grad is None:
            raise InternalFault("no gradient reached the cut: the server segment ignores its input")
        try:
            return self.grad_codec.encode(grad)
        except CodecError as exc:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"training diverged at step {step}: {exc}; lower --lr, or "
                "use a finer codec for this cut"
            ) from None

    def check_finite(
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

    def known_classes(self) -> int | None:
        """The class count if known before a forward pass: given, from the spec, or from the
        logits of an earlier step."""
        if self.num_classes is not None:
            return self.num_classes
        shapes = self.spec.get("shapes")
        classes = shapes.get("num_classes") if isinstance(shapes, dict) else None
        if isinstance(classes, int) and not isinstance(classes, bool) and classes > 0:
            return classes
        return self._classes

    def packs_labels(self) -> bool:
        """Whether this server reads packed labels ``y`` (it knows the class count up front,
        and the count fits 8-bit codes); a WELCOME says so."""
        classes = self.known_classes()
        return self.rules.logits and classes is not None and classes <= MAX_PACKED_CLASSES

    def check_classes(self, labels: torch.Tensor) -> None:
        """Labels against the class count, before any forward pass, when it is known (the rules
        check after the forward pass too, against the logits' width)."""
        classes = self.known_classes()
        if classes is not None:
            check_labels(labels, classes)

    def check_logits(self, labels: torch.Tensor, logits: torch.Tensor) -> None:
        """Labels against the logits' width (remembered for the next pre-forward check)."""
        check_labels(labels, logits.shape[1])
        self._classes = int(logits.shape[1])

    def _client_models(self, message: Message) -> ModelTable:
        """The entropy models of ``message.client``, plus the one the message carries."""
        with self._cond:
            # an empty table for a client that never sent a model is not kept
            table = self._models.get(message.client) or ModelTable()
        if "emodel" in message.tensors:
            freqs = decode_frame(message.tensors["emodel"], self.limits)
            if freqs.dtype != np.uint16 or freqs.ndim != 2:
                raise ProtocolError(
                    f"emodel must be a 2-D uint16 frequency table, got {freqs.dtype} "
                    f"{tuple(freqs.shape)}"
                )
            model = EntropyModel(freqs)  # validates sizes and values
            with self._cond:
                table = self._models.setdefault(message.client, table)
                table.add(model)
        return table

    def decode_act(self, message: Message, session: Session | None) -> torch.Tensor:
        """The activation frame, decoded and checked (and its codec against the session's)."""
        frame = message.frame("act")
        if session is not None and session.family is not None:
            got = frame_family(frame, self.limits)
            allowed = {session.family}
            if self.controller is not None:
                allowed |= {codec_family(spec) for spec in self.controller.ladder}
            if got not in allowed:
                raise ProtocolError(
                    f"activation frame uses codec {'+'.join(got) or 'raw'}; this session's "
                    f"HELLO announced {session.codec!r}"
                )
        with use_models(self._client_models(message)):
            act = self.act_codec.decode(frame)
        if act.ndim < 2 or len(act) == 0:
            raise ProtocolError(
                f"activation frame must be a non-empty batch, got {tuple(act.shape)}"
            )
        return act

    def check_drift(self, act: torch.Tensor, party: int = 0) -> Verdict | None:
        """``act`` against the training reference of client segment ``party`` (outside the
        lock; changes nothing); ``None`` when the server has no drift guard."""
        return None if self.drift is None else self.drift.check(act, party)

    def screen_drift(
        self, message: Message, verdict: Verdict | None, *, train: bool, party: int | None = None
    ) -> dict[str, Any] | None:
        """Count ``verdict`` for the sender (under the lock, before the step is applied).
        A drifted training step under policy ``refuse`` is refused (``FAILED_PRECONDITION``,
        one sentence naming the channels and ranges); otherwise returns the ``drift`` record
        for the reply's meta (``None``: no drift), also published to the metrics log."""
        if self.drift is None or verdict is None:
            return None
        if self.drift.screen(message.client, message.kind, message.step, verdict, train=train):
            whose = "" if party is None else f"party {party}: "
            raise PreconditionFailed(
                f"refused {message.kind} step {message.step}: {whose}{verdict.sentence()}; "
                "check the client's device and preprocessing against the training data"
            )
        if not verdict.drift:
            return None
        record = verdict.record()
        self._probes.publish(
            {
                "time": time.time(),
                "event": "drift",
                "client": message.client,
                "kind": message.kind,
                "step": message.step,
                **({} if party is None else {"party": party}),
                "drift": record,
            }
        )
        return record

    def labels(self, message: Message, batch: int) -> torch.Tensor:
        """The labels (a ``labels`` frame or packed ``y``), decoded and checked against the batch
        and the class count."""
        if PACKED_LABELS in message.tensors:
            if "labels" in message.tensors:
                raise ProtocolError("send labels once: as a 'labels' frame or as packed 'y'")
            classes = self.known_classes()
            if classes is None or classes > MAX_PACKED_CLASSES:
                raise ProtocolError(
                    "packed labels 'y' need a server that knows the class count (its WELCOME "
                    "says labels=y); send a 'labels' frame instead"
                )
            packed = unpack_labels(message.tensors[PACKED_LABELS], batch, classes)
            return torch.from_numpy(packed)
        labels = decode_labels(message.frame("labels"), self.limits)
        if labels.shape != (batch,):
            raise ProtocolError(
                f"labels shape {tuple(labels.shape)} does not match the batch "
                f"of {batch} activations"
            )
        self.check_classes(labels)
        return labels

    def optional_labels(self, message: Message, batch: int) -> torch.Tensor | None:
        """:meth:`labels` when the message carries some (PREDICT, a vertical party), else None."""
        if "labels" in message.tensors or PACKED_LABELS in message.tensors:
            return self.labels(message, batch)
        return None

    def reference(self, message: Message, act: torch.Tensor) -> torch.Tensor | None:
        """The probe's fp32 copy of ``act``, decoded and checked; None when not a probe."""
        if "act_ref" not in message.tensors:
            return None
        ref = self.act_codec.decode(message.tensors["act_ref"])
        if ref.shape != act.shape:
            raise ProtocolError(f"act_ref shape {tuple(ref.shape)} != act {tuple(act.shape)}")
        return ref

    def count(
        self, client: str, n: int, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, Any]:
        """Add a trained step to ``client``'s counters; returns the step's loss and correct
        count (:func:`~edgesplit.train.server_records.report_step` turns them into the reply's
        report, when the client asks for one)."""
        value = float(loss.detach())
        correct = int((logits.argmax(1) == labels).sum())
        stats = self.stats[client]
        stats.steps += 1
        stats.samples += n
        stats.labelled += n
        stats.loss_sum += value * n
        stats.correct += correct
        return {"loss": value, "correct": correct}

    def prediction(
        self, message: Message, logits: torch.Tensor, labels: torch.Tensor | None
    ) -> Message:
        """The PREDICTION reply: class ids (with labels: how many were right, and the loss)."""
        # class ids travel in the smallest integer type that holds them, like labels
        pred = logits.argmax(1).numpy().astype(label_dtype(logits.shape[1]))
        meta: dict[str, Any] = {"n": len(pred)}
        if labels is not None:
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

    def probe(
        self, message: Message, act: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor | None
    ) -> dict[str, Any] | None:
        """Compare the decoded batch with the same batch sent at fp32 (under the lock): what
        compression costs, for this client over the interval since its previous probe. Returns
        the codec switch this probe caused (with a bitrate controller), else ``None``."""
        stats = self.stats[message.client]
        interval = {
            "interval_steps": stats.steps - stats.probe_steps,
            "interval_bytes_in": stats.bytes_in - stats.probe_bytes_in,
        }
        record = self._probes.measure(
            self.segment, message, act, ref, labels, logits=self.rules.logits, interval=interval
        )
        stats.probe_steps, stats.probe_bytes_in = stats.steps, stats.bytes_in
        self._probes.publish(record)
        switch: dict[str, Any] | None = record.get("switch")
        return switch
