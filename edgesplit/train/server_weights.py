"""Client weights that pass through the server: the vanilla/ushape hand-off (one client leaves
its lower layers for the next) and the splitfed FedAvg round.

Nothing a client sends here reaches another client unchecked: every ``put`` and every FedAvg
contribution must be frames of the expected parameter names, shapes and dtypes (the schema is
given by the server's owner, or fixed by the first accepted contribution), with finite values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edgesplit.errors import ProtocolError
from edgesplit.train.server_checks import PreconditionFailed, meta_float, meta_int, meta_str
from edgesplit.train.server_records import Session
from edgesplit.wire.frame import FrameLimits, decode_frame, encode_frame
from edgesplit.wire.messages import Kind, Message

if TYPE_CHECKING:
    from edgesplit.train.server import SplitServer

#: name -> (shape, dtype name) of the lower segment's state dict.
Schema = dict[str, tuple[tuple[int, ...], str]]


def schema_of(arrays: dict[str, np.ndarray]) -> Schema:
    """The schema a set of decoded arrays has."""
    return {n: (tuple(int(d) for d in a.shape), a.dtype.name) for n, a in arrays.items()}


@dataclass
class WeightFrames:
    """A validated set of weight frames and their decoded arrays."""

    frames: dict[str, bytes]
    arrays: dict[str, np.ndarray]


def check_weights(message: Message, limits: FrameLimits, schema: Schema | None) -> WeightFrames:
    """Decode and check the weight frames of a WEIGHTS message.

    Raises
    ------
    ProtocolError
        No frames, a frame that does not decode, names/shapes/dtypes other than ``schema``'s,
        or non-finite values.
    FrameError, CodecError
        From the frame decoder.
    """
    if not message.tensors:
        raise ProtocolError("weights message carries no weight frames")
    if schema is not None and set(message.tensors) != set(schema):
        missing = sorted(set(schema) - set(message.tensors))
        extra = sorted(set(message.tensors) - set(schema))
        raise ProtocolError(
            f"weights must carry the lower segment's parameters; missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    arrays: dict[str, np.ndarray] = {}
    for name, frame in message.tensors.items():
        array = decode_frame(frame, limits)
        if schema is not None:
            shape, dtype = schema[name]
            if tuple(array.shape) != shape or array.dtype.name != dtype:
                raise ProtocolError(
                    f"weight {name!r} is {array.dtype.name} {tuple(array.shape)}; expected "
                    f"{dtype} {shape}"
                )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ProtocolError(f"weight {name!r} holds non-finite values")
        arrays[name] = array
    return WeightFrames(dict(message.tensors), arrays)


def fedavg(parts: dict[int, tuple[float, dict[str, np.ndarray]]]) -> dict[str, bytes]:
    """The sample-weighted average of every participant's weights, as fp32 frames.

    Summed in participant-index order (never arrival order): floating-point addition is not
    associative, and a run with a fixed seed must give the same weights every time.
    """
    order = sorted(parts)
    names = sorted(parts[order[0]][1])
    for k in order:
        if sorted(parts[k][1]) != names:
            raise ProtocolError("FedAvg participants sent different parameter names")
    total = sum(parts[k][0] for k in order)
    out: dict[str, bytes] = {}
    for n in names:
        acc = np.zeros(parts[order[0]][1][n].shape, dtype=np.float64)
        for k in order:
            weight, arrays = parts[k]
            if arrays[n].shape != acc.shape:
                raise ProtocolError(f"FedAvg participants sent different shapes for {n!r}")
            acc += weight * arrays[n].astype(np.float64)
        out[n] = encode_frame((acc / total).astype(np.float32), "fp32")
    return out


class HandOff:
    """The weights one client leaves for the next (SplitNN's schedule) and how many were left.

    Not thread-safe on its own: the server calls it under its lock.
    """

    def __init__(self, schema: Schema | None = None) -> None:
        #: Expected weights; ``None`` until given or fixed by the first accepted put.
        self.schema = schema
        self.frames: dict[str, bytes] | None = None
        self.count = 0

    def put(self, weights: WeightFrames) -> None:
        """Keep validated weights for the next client."""
        if self.schema is None:
            self.schema = schema_of(weights.arrays)
        self.frames = dict(weights.frames)
        self.count += 1

    def reply(self, message: Message) -> Message:
        """The WEIGHTS reply carrying the kept weights."""
        return Message(
            Kind.WEIGHTS, message.session, message.client, message.step, dict(self.frames or {})
        )

    def export(self) -> dict[str, Any]:
        import base64

        return {
            "handoffs": self.count,
            "handoff": {n: base64.b64encode(f).decode() for n, f in (self.frames or {}).items()},
            "weight_schema": (
                {n: [list(s), d] for n, (s, d) in self.schema.items()} if self.schema else None
            ),
        }

    def restore(self, meta: dict[str, Any]) -> None:
        import base64

        self.count = int(meta["handoffs"])
        self.frames = {n: base64.b64decode(f) for n, f in meta["handoff"].items()} or None
        saved = meta.get("weight_schema")
        if saved:
            self.schema = {n: (tuple(s), str(d)) for n, (s, d) in saved.items()}


class WeightExchange:
    """WEIGHTS messages: the hand-off (``put``/``get``) and the FedAvg round (``average``).

    :meth:`prepare` decodes and checks outside the server lock; :meth:`apply` runs under it
    (a ``get`` or an ``average`` waits there, the lock released, for the others).
    """

    def __init__(self, schema: Schema | None = None) -> None:
        self.handoff = HandOff(schema)
        #: FedAvg rounds completed (splitfed).
        self.rounds = 0

    def prepare(self, host: SplitServer, message: Message) -> tuple[str, Any]:
        """Decode and check a WEIGHTS request (changes nothing)."""
        mode = meta_str(message, "mode")
        if mode == "put":  # SplitNN hand-off: keep the lower weights for the next client
            return mode, check_weights(message, host.limits, self.handoff.schema)
        if mode == "get":  # wait for this client's turn: the hand-offs before it are done
            return mode, meta_int(message, "turn", 0)
        if mode == "average":  # splitfed: FedAvg over every client of the round
            clients = meta_int(message, "clients", lo=1, hi=4096)
            expected = host.expected_clients()
            if expected is not None and clients != expected:
                raise PreconditionFailed(
                    f"this run averages {expected} clients; the message says clients={clients}"
                )
            rnd = meta_int(message, "round", lo=0)
            index = meta_int(message, "index", lo=0, hi=clients - 1)
            weight = meta_float(message, "n_samples", 1.0, positive=True)
            group = meta_str(message, "group") or ""
            weights = check_weights(message, host.limits, self.handoff.schema)
            return mode, (clients, rnd, index, weight, group, weights)
        raise ProtocolError(f"weights message needs meta mode put|get|average, got {mode!r}")

    def apply(
        self,
        host: SplitServer,
        message: Message,
        prepared: tuple[str, Any],
        session: Session | None,
    ) -> Message:
        """Apply a prepared WEIGHTS request (under the server lock)."""
        mode, value = prepared
        cond = host.lock
        if mode == "put":
            self.handoff.put(value)
            cond.notify_all()
            return Message(Kind.ACK, message.session, message.client, message.step)
        if mode == "get":
            return self._get(host, message, int(value))
        clients, rnd, index, weight, group, weights = value
        if self.handoff.schema is None:
            self.handoff.schema = schema_of(weights.arrays)

        def average(parts: dict[int, tuple[float, dict[str, np.ndarray]]]) -> dict[int, Message]:
            tensors = host.guard(lambda: fedavg(parts))
            return {k: Message(Kind.WEIGHTS, "", "", 0, tensors) for k in parts}

        ordered = session is not None and session.index is not None
        schedule = host.schedule() if ordered else None
        if schedule is not None and session is not None and session.index != index:
            raise PreconditionFailed(
                f"FedAvg index {index} is not this session's client index {session.index}"
            )
        if schedule is not None:
            schedule.averaging(index, rnd)  # out of the way of the others' remaining steps
            cond.notify_all()
        try:
            reply = host.barriers.meet(
                (f"avg:{group}", rnd), clients, index, (weight, weights.arrays), average
            )
        except BaseException:
            if schedule is not None:
                schedule.left(index)
                cond.notify_all()
            raise
        if schedule is not None:
            schedule.averaged(index, rnd)
            cond.notify_all()
        self.rounds = max(self.rounds, rnd + 1)
        return Message(Kind.WEIGHTS, message.session, message.client, message.step, reply.tensors)

    def _get(self, host: SplitServer, message: Message, turn: int) -> Message:
        count = self.handoff
        if not host.lock.wait_for(lambda: count.count >= turn, host.wait_timeout):
            raise TimeoutError(
                f"turn {turn} did not come within {host.wait_timeout:.0f}s "
                f"({count.count} hand-offs so far)"
            )
        if count.count > turn:
            # turn t is served right after the t-th hand-off; more means these turns
            # belong to a run this server has already finished
            raise PreconditionFailed(
                f"turn {turn} was already taken ({count.count} hand-offs done): this "
                "server finished an earlier run; start a fresh `edgesplit serve` (or a "
                "fresh --state) for a new networked training run"
            )
        return self.handoff.reply(message)
