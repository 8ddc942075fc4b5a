"""The server role: holds the full-precision upper (or middle) segment and answers protocol
messages. The same object serves the in-process engine and the gRPC server.

It never trusts a peer: every frame is decoded by the hardened decoder and every meta field is
read by an explicit check (:mod:`~edgesplit.train.server_checks`), so a peer's mistake becomes an
``INVALID_ARGUMENT``/``FAILED_PRECONDITION`` reply naming what was wrong, and anything else is a
server fault: an ``INTERNAL`` reply and a logged traceback, never a crash. A repeated step is
answered from the record instead of being applied twice.

Each concern has one home: the configuration's step rules (:mod:`.server_rules`), the sessions,
their replay records and byte budget (:mod:`.server_records`), who may join the run
(:mod:`.server_admission`), weights passed between clients (:mod:`.server_weights`), the
splitfed order and client-index owners (:mod:`.server_schedule`), segment and request helpers
(:mod:`.server_segment`), probes (:mod:`.server_probes`), persisted state and status
(:mod:`.server_state`) and the barrier of several participants (:mod:`.barrier`). This module
ties them together: sessions, replay, HELLO/BYE. One lock guards the shared weights and the
records; decoding happens outside it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from edgesplit.codecs.entropy import ModelTable
from edgesplit.codecs.fixed import FixedRange
from edgesplit.errors import (
    CodecError,
    ConfigError,
    EdgesplitError,
    FrameError,
    ProtocolError,
    TrainingDiverged,
)
from edgesplit.split.bottleneck import param_groups
from edgesplit.split.defense import Defense
from edgesplit.train import server_state
from edgesplit.train.barrier import Barriers
from edgesplit.train.controller import BitrateController
from edgesplit.train.frames import TensorCodec
from edgesplit.train.server_admission import RunAdmission
from edgesplit.train.server_checks import (
    HelloTerms,
    InternalFault,
    PreconditionFailed,
    error_code,
    hello_terms,
    meta_int,
)
from edgesplit.train.server_drift import DriftGuard
from edgesplit.train.server_probes import ProbeLog
from edgesplit.train.server_records import RecordLimits, Session, SessionTable, report_step
from edgesplit.train.server_rules import Batch, rules_for
from edgesplit.train.server_schedule import IndexOwners, SplitFedSchedule
from edgesplit.train.server_segment import SegmentSteps
from edgesplit.train.server_state import ClientStats
from edgesplit.train.server_weights import HandOff, Schema, WeightExchange
from edgesplit.wire.frame import FrameLimits
from edgesplit.wire.labels import PACKED_LABELS
from edgesplit.wire.messages import (
    Kind,
    Message,
    error_message,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Kinds whose effect must happen once per step (their replies are recorded for retries);
#: FORWARD only where the configuration's FORWARD changes the weights.
_RECORDED = {Kind.FORWARD, Kind.MIDDLE_GRAD, Kind.WEIGHTS}
#: Kinds an infer-only session may not send.
_TRAINING = {Kind.FORWARD, Kind.MIDDLE_GRAD, Kind.WEIGHTS}
#: Default per-frame limits on a server: 16 Mi elements, 64 MiB decoded.
SERVER_LIMITS = FrameLimits(max_elements=1 << 24, max_decoded_bytes=1 << 26)


class SplitServer(SegmentSteps):
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
        so a networked client builds exactly the segment the server expects. Its ``clients``
        and ``epochs`` also bound who may join the run (:mod:`~edgesplit.train.server_admission`).
    require_hello:
        Refuse any step of a session that did not open with HELLO (a deployed server; the
        in-process engine sends no HELLO).
    record_limits:
        Bytes and sessions kept per client and in total
        (:class:`~edgesplit.train.server_records.RecordLimits`).
    weight_schema:
        Names, shapes and dtypes of the lower segment's weights: a hand-off or FedAvg
        contribution of anything else is refused (``None``: fixed by the first accepted one).
    num_classes:
        The class count, when known up front.
    drift:
        Screens every FORWARD/PREDICT's activations against the training distribution
        (:class:`~edgesplit.train.server_drift.DriftGuard`, built from a checkpoint's
        ``drift_reference``): ``flag`` marks drifted steps in the reply and the metrics log,
        ``refuse`` refuses drifted training steps before they are applied. ``None``: no screen
        (a server trained from scratch has no reference).
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
        require_hello: bool = False,
        record_limits: RecordLimits | None = None,
        weight_schema: Schema | None = None,
        num_classes: int | None = None,
        drift: DriftGuard | None = None,
    ) -> None:
        self.rules = rules_for(config)  # refuses an unknown configuration
        #: The class count, when known up front (else the spec's, or the first logits'): packed
        #: labels ``y`` carry no header and need it.
        self.num_classes = num_classes
        self.config = config
        self.segment = segment
        self.optimizer = optimizer or torch.optim.SGD(
            param_groups(segment, lr), lr=lr, momentum=momentum
        )
        self.limits = limits
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
        self.require_hello = require_hello
        self.stats: dict[str, ClientStats] = defaultdict(ClientStats)
        self.steps_applied = 0
        self._cond = threading.Condition(threading.RLock())
        #: Sessions, their replay records and pending forwards, bounded in bytes.
        self.table = SessionTable(record_limits)
        self.barriers = Barriers(self._cond, lambda: self.wait_timeout)
        #: Weights passed between clients: the hand-off and the FedAvg round.
        self.weights = WeightExchange(weight_schema)
        self.admission = RunAdmission()
        self._probes = ProbeLog(controller, on_probe)
        self.spec = spec or {}
        self.group = uuid.uuid4().hex[:8]
        #: Called (under the server lock) after every applied step, before its reply leaves:
        #: ``serve`` checkpoints here, so a restart never loses a step a client saw answered.
        self.on_applied: Callable[[], None] | None = None
        self._in_flight: set[tuple[str, str, tuple[str, int]]] = set()
        #: Per-sample shape of the activations accepted steps sent (for refusals' wording).
        self._cut_shape: tuple[int, ...] | None = None
        #: The fixed order of splitfed steps (created once the client count is known).
        self._schedule: SplitFedSchedule | None = None
        #: Which client holds each client index (vertical: party).
        self.owners = IndexOwners()
        #: Class count seen in the logits of an accepted step (labels are checked against it).
        self._classes: int | None = None
        #: Screens incoming activations against the training distribution (None: off).
        self.drift = drift

    # ------------------------------------------------------------------ attributes kept public
    @property
    def on_probe(self) -> Callable[[dict[str, Any]], None] | None:
        """Called with a dict of metrics whenever a probe is evaluated."""
        return self._probes.on_probe

    @on_probe.setter
    def on_probe(self, value: Callable[[dict[str, Any]], None] | None) -> None:
        self._probes.on_probe = value

    @property
    def probes(self) -> deque[dict[str, Any]]:
        """The latest probe records (at most 1000), oldest first."""
        return self._probes.records

    @property
    def latest_probe(self) -> dict[str, dict[str, Any]]:
        """Each client's latest probe record."""
        return self._probes.latest

    @property
    def handoff(self) -> HandOff:
        """The weights one client left for the next, and how many hand-offs came."""
        return self.weights.handoff

    @property
    def handoffs(self) -> int:
        """Hand-offs received so far (the vanilla/ushape turn counter)."""
        return self.weights.handoff.count

    @property
    def rounds(self) -> int:
        """FedAvg rounds completed (splitfed)."""
        return self.weights.rounds

    @property
    def lock(self) -> threading.Condition:
        """The condition (over a re-entrant lock) that guards the shared weights and records."""
        return self._cond

    def set_limits(self, limits: FrameLimits) -> None:
        """Change what one received frame may claim (``serve --max-tensor-mib``)."""
        self.limits = self.act_codec.limits = self.grad_codec.limits = limits
        self.mid_codec.limits = limits

    def expected_clients(self) -> int | None:
        """How many clients (vertical: parties) the run trains, when the spec says."""
        value = self.spec.get("clients")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    # ------------------------------------------------------------------ entry point
    def handle(self, message: Message) -> Message:
        """Answer one request. Never raises: a refusal or a server fault is an ERROR reply.

        A peer's mistake (a bad frame or meta field, a step its session may not take) gets
        ``INVALID_ARGUMENT``, ``FAILED_PRECONDITION`` or ``RESOURCE_EXHAUSTED`` with a sentence
        naming the field; a step that diverged ``FAILED_PRECONDITION``; anything unexpected is
        the server's fault: ``INTERNAL`` and a traceback in the log.
        """
        try:
            reply = self._handle_once(message)
        except TrainingDiverged as exc:
            reply = self._refuse(message, "FAILED_PRECONDITION", exc)
            reply.meta["diverged"] = True
        except InternalFault as exc:
            log.error(
                "server fault on %s step %d from %r: %s",
                message.kind,
                message.step,
                message.client,
                exc,
            )
            reply = self._refuse(message, "INTERNAL", exc)
        except (FrameError, CodecError, ProtocolError, ConfigError) as exc:
            reply = self._refuse(message, error_code(exc), exc)
        except TimeoutError as exc:
            reply = self._refuse(message, "DEADLINE_EXCEEDED", exc)
        except Exception as exc:  # a bug here must not be blamed on the client, nor crash it
            log.exception(
                "server fault on %s step %d of session %r from client %r",
                message.kind,
                message.step,
                message.session,
                message.client,
            )
            reply = self._refuse(
                message,
                "INTERNAL",
                f"the server failed on this {message.kind} step ({type(exc).__name__}); "
                "see the server log",
            )
        with self._cond:
            stats = self.stats[message.client]
            stats.bytes_in += message.tensor_bytes()
            stats.bytes_out += reply.tensor_bytes()
            stats.last_seen = time.time()
        return reply

    def guard(self, fn: Callable[[], T]) -> T:
        """Run ``fn``; an unexpected exception becomes an :class:`InternalFault` (logged), so
        it reaches every participant of a barrier as the server's fault, not the peer's."""
        try:
            return fn()
        except (EdgesplitError, TimeoutError):
            raise
        except Exception as exc:
            log.exception("server fault inside a barrier computation")
            raise InternalFault(
                f"the server failed on this step ({type(exc).__name__}); see the server log"
            ) from exc

    def _refuse(self, message: Message, code: str, exc: Exception | str) -> Message:
        with self._cond:
            self.stats[message.client].errors += 1
        log.warning(
            "refused %s from %s step %d: %s: %s",
            message.kind,
            message.client,
            message.step,
            code,
            exc,
        )
        return error_message(message, code, str(exc))

    def _handle_once(self, message: Message) -> Message:
        kind = message.kind
        if kind == Kind.HELLO:
            return self._hello(message)
        if kind == Kind.BYE:
            return self._bye(message)
        if kind == Kind.STATUS:
            return Message(
                Kind.STATUS, message.session, message.client, message.step, meta=self.status()
            )
        if kind not in (Kind.FORWARD, Kind.PREDICT, Kind.MIDDLE_GRAD, Kind.WEIGHTS):
            expected = (
                Kind.BYE,
                Kind.FORWARD,
                Kind.HELLO,
                Kind.MIDDLE_GRAD,
                Kind.PREDICT,
                Kind.STATUS,
                Kind.WEIGHTS,
            )
            raise ProtocolError(
                f"server does not accept {kind[:40]!r} messages; expected one of "
                f"{', '.join(expected)}"
            )
        recorded = kind in _RECORDED and (kind != Kind.FORWARD or self.rules.forward_applies)
        if not recorded:
            with self._cond:
                session = self._session_for(message)
            batch = self._prepare(message, session)
            with self._cond:
                return self._apply_unrecorded(message, batch)
        return self._apply_once(message)

    def _apply_unrecorded(self, message: Message, batch: Batch) -> Message:
        """A step that is safe to repeat (PREDICT, a ushape FORWARD); under the lock."""
        session = self._session_for(message)
        created = session is None and message.kind == Kind.FORWARD
        if created:  # a ushape FORWARD keeps its graph in its session
            session = self.table.open(message.client, message.session)
        try:
            return self.rules.apply(self, message, batch, session)
        except BaseException:
            if created:  # a refused request leaves nothing behind
                self.table.release(message.client, message.session)
            raise

    def _apply_once(self, message: Message) -> Message:
        """Apply a mutating request exactly once.

        The record is checked under the lock; the request is decoded outside it; the step, its
        record and the checkpoint hook then run in one critical section, so the step counters,
        the records and the saved state always agree. A duplicate that arrives while its
        original is in flight (decoding, or waiting at a barrier) waits for the original's
        record instead of applying the step again.
        """
        key = (message.kind, message.step)
        flight = (message.client, message.session, key)
        with self._cond:
            while True:
                session = self._session_for(message)
                if session is not None:
                    kept = session.reply(key)
                    if kept is not None:
                        self.stats[message.client].repeats += 1
                        return kept
                if flight not in self._in_flight:
                    break
                self._cond.wait(self.wait_timeout)
            self._check_order(session, key)
            self._in_flight.add(flight)
        try:
            batch = self._prepare(message, session)
            with self._cond:
                session = self._session_for(message)
                self._check_order(session, key)
                reply = self._apply(message, batch, session)
                if reply.kind != Kind.ERROR:
                    session = session or self.table.open(message.client, message.session)
                    if isinstance(batch, Batch):  # a training step (WEIGHTS prepare others)
                        report_step(session, message, reply, len(batch.act))
                    if not self.table.keep_reply(session, key, reply):
                        log.warning(
                            "reply to %s step %d of %r (%d bytes) exceeds the record budget: "
                            "not kept",
                            message.kind,
                            message.step,
                            message.client,
                            reply.tensor_bytes(),
                        )
                    self.admission.observe(
                        self.spec,
                        turn_based=self.rules.turn_based,
                        federated=self.rules.federated,
                        handoffs=self.handoffs,
                        rounds=self.rounds,
                    )
                    if self.on_applied is not None:
                        self.on_applied()
        finally:
            with self._cond:
                self._in_flight.discard(flight)
                self._cond.notify_all()
        return reply

    def _session_for(self, message: Message) -> Session | None:
        """The session ``message`` belongs to, checked against what its HELLO bound (under
        the lock). Never creates one."""
        session = self.table.find(message.client, message.session)
        if session is None:
            session = self.table.adopt(message.client, message.session)
            if session is not None and session.index is not None:
                # the index an anonymous HELLO claimed belongs to the name its steps use
                self.owners.rename(session.index, "", message.client)
        if session is None or not session.hello:
            if self.require_hello:
                raise PreconditionFailed(
                    f"{message.kind} before HELLO: open session {message.session[:40]!r} "
                    "with HELLO first"
                )
            return session
        if session.mode == "infer" and message.kind in _TRAINING:
            raise PreconditionFailed(
                f"session {message.session[:40]!r} said mode=infer in its HELLO; it cannot "
                f"send {message.kind} (open a session with mode=train to train)"
            )
        return session

    @staticmethod
    def _check_order(session: Session | None, key: tuple[str, int]) -> None:
        """Refuse a step at or before the session's last applied one that has no record: it
        was applied (or is older), so it must never be applied (again)."""
        if session is None or key[1] > session.last_step:
            return
        if key[1] == session.last_step:
            raise PreconditionFailed(
                f"step {key[1]} was already applied but its reply is no longer kept (the "
                "server's record budget evicted it); go on from step "
                f"{session.last_step + 1}"
            )
        raise ProtocolError(
            f"step {key[1]} is older than the last applied step {session.last_step}; "
            "steps must increase within a session"
        )

    def _prepare(self, message: Message, session: Session | None) -> Any:
        """Decode and check a step's request (outside the lock)."""
        if message.kind == Kind.WEIGHTS:
            return self.weights.prepare(self, message)
        return self.rules.prepare(self, message, session)

    def _apply(self, message: Message, batch: Any, session: Session | None) -> Message:
        if message.kind == Kind.WEIGHTS:
            return self.weights.apply(self, message, batch, session)
        return self.rules.apply(self, message, batch, session)

    # ------------------------------------------------------------------ session set-up
    def _hello(self, message: Message) -> Message:
        claimed = message.meta.get("run_id")
        if self.run_id and claimed and claimed != self.run_id:
            raise PreconditionFailed(
                f"this bundle comes from training run {str(claimed)[:40]}, but this server "
                f"holds the layers of run {self.run_id}: export the bundle from the checkpoint "
                "this server runs (or serve the bundle's own .server directory)"
            )
        terms = hello_terms(message, self.config)
        with self._cond:
            session = self.table.find(message.client, message.session)
            if session is not None and session.hello:
                # a reconnecting client says HELLO again: it may repeat its terms or leave them
                # out, not change them
                if terms.mode is not None and terms.mode != session.mode:
                    raise PreconditionFailed(
                        f"session {message.session[:40]!r} was opened with mode={session.mode}; "
                        f"a HELLO with mode={terms.mode} needs a new session id"
                    )
                terms = HelloTerms(
                    session.mode,
                    terms.config or session.config,
                    terms.codec or session.codec,
                    terms.family or session.family,
                )
            elif terms.mode != "infer":
                self.admission.admit(message.client, self.spec)
            index = self._hello_index(message, session)
            session = self.table.open(message.client, message.session)
            session.index = index
            session.hello = True
            session.mode, session.config = terms.mode, terms.config
            session.codec, session.family = terms.codec, terms.family
            resume = session.last_step + 1
            codec = (
                self.controller.codec_for(message.client)
                if self.controller
                else self.act_codec.codec.spec
            )
        return Message(
            Kind.WELCOME,
            message.session,
            message.client,
            message.step,
            meta={
                "config": self.config,
                "resume_step": resume,
                "codec": codec,
                "grad_codec": self.grad_codec.codec.spec,
                "spec": self.spec,
                "group": self.group,
                "run_id": self.run_id,
                # this server reads bare packed labels: a client may send them as tensor "y"
                **({"labels": PACKED_LABELS} if self.packs_labels() else {}),
            },
        )

    def _hello_index(self, message: Message, session: Session | None) -> int | None:
        """The client index a HELLO names (it orders splitfed steps): within the run's client
        count, and held by one client only. A repeated HELLO keeps its session's index."""
        if session is not None and session.index is not None:
            return session.index
        if "index" not in message.meta:
            return None
        expected = self.expected_clients()
        index = meta_int(message, "index", hi=(expected - 1) if expected else 4095)
        self.claim_index(index, message.client)
        self.used_index(index)  # HELLO is answered right after this
        return index

    def claim_index(self, index: int, client: str) -> bool:
        """Bind client index (vertical: party) ``index`` to ``client`` (under the lock); see
        :class:`~edgesplit.train.server_schedule.IndexOwners`."""
        return self.owners.claim(index, client)

    def release_index(self, index: int) -> None:
        """Give back a claim whose request failed."""
        self.owners.release(index)

    def used_index(self, index: int) -> None:
        """A request under ``index`` was answered: the claim is kept for good."""
        self.owners.used(index)

    def schedule(self) -> SplitFedSchedule | None:
        """The fixed order of splitfed steps, when this is a splitfed run of known size."""
        expected = self.expected_clients()
        if not self.rules.federated or not expected:
            return None
        if self._schedule is None or self._schedule.clients != expected:
            self._schedule = SplitFedSchedule(expected)
        return self._schedule

    def wait_turn(self, session: Session | None) -> int | None:
        """Wait (under the lock, releasing it) until this session's splitfed step is next in
        the round's fixed order; returns the client index to pass to :meth:`stepped`, or
        ``None`` when steps are not ordered (not splitfed, no index)."""
        schedule = self.schedule()
        if schedule is None or session is None or session.index is None:
            return None
        schedule.wait_turn(self._cond, session.index, self.wait_timeout)
        return session.index

    def stepped(self, index: int | None) -> None:
        """A step of client ``index`` was applied: the next in the order may go."""
        schedule = self.schedule()
        if schedule is not None and index is not None:
            schedule.stepped(index)
            self._cond.notify_all()

    def _bye(self, message: Message) -> Message:
        """The client is done with this session: forget everything it held."""
        with self._cond:
            session = self.table.find(message.client, message.session)
            if session is not None and session.hello and session.mode != "infer":
                self.admission.bye(message.client, self.spec)
            self.table.release(message.client, message.session)
        return Message(Kind.ACK, message.session, message.client, message.step)

    def close_session(self, client: str, session: str) -> None:
        """The session's stream closed: release what it held, all but what a client that
        reconnects needs to go on: its last applied step (an integer), that step's reply (a
        resend is answered, never applied twice) and its latest pending ushape forward (its
        MIDDLE_GRAD may follow). They stay counted in the record budget; BYE releases them."""
        with self._cond:
            self.table.release(client, session, keep_last=True)

    def held_bytes(self, client: str | None = None) -> int:
        """Bytes the server keeps for ``client`` (every client: ``None``): replies, pending
        forwards and session bookkeeping, by the server's own accounting."""
        with self._cond:
            return self.table.held(client)

    # ------------------------------------------------------------------ persisted state
    def export_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(tensors for ``torch.save``, JSON-able counters): everything a restart needs so that
        no applied step is lost and a retried step is still answered from the record."""
        with self._cond:
            return server_state.export_state(self)

    def import_state(self, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
        """Restore what :meth:`export_state` saved."""
        with self._cond:
            server_state.import_state(self, tensors, meta)

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot: per client counters, the latest probes, what the server keeps
        for its clients against its budget, and the run's members."""
        with self._cond:  # gRPC threads add clients and probes while we read
            return server_state.status(self)
