"""Protocol messages: what the training engine and the edge runtime say to a server.

A :class:`Message` is transport-neutral. Tensors travel inside it only as encoded frames
(``bytes`` made by :func:`edgesplit.wire.frame.encode_frame`), so the in-process transport and
gRPC carry exactly the same bytes and byte counts are the lengths of real frames. Scalars and
small settings travel in ``meta`` (JSON-serialisable values only — never pickle).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgesplit.errors import ProtocolError, TrainingDiverged, TransportError


class Kind:
    """Message kinds. Requests come from clients, replies from the server."""

    # session set-up
    HELLO = "hello"  # client -> server: meta {config, mode, codec, grad_codec, ...}
    WELCOME = "welcome"  # server -> client: meta {session settings, resume_step}
    # one training or inference step
    FORWARD = "forward"  # tensors {act, [labels], [act_ref]} meta {train, want_grad}
    GRADIENT = "gradient"  # tensors {[grad]} meta {loss, correct, n}
    PREDICT = "predict"  # tensors {act} -> PREDICTION
    PREDICTION = "prediction"  # tensors {pred} (class ids, smallest unsigned type)
    # ushape: the server holds the middle, the client holds the head and labels
    MIDDLE = "middle"  # server -> client: tensors {mid}
    MIDDLE_GRAD = "middle_grad"  # client -> server: tensors {grad} -> GRADIENT (cut gradient)
    # weights: splitfed averaging, vanilla hand-off between clients
    WEIGHTS = "weights"  # tensors {<param name>: frame} meta {round, n_samples}
    # housekeeping
    ACK = "ack"
    STATUS = "status"
    ERROR = "error"  # meta {code, message}
    BYE = "bye"


@dataclass
class Message:
    """One protocol message.

    Attributes
    ----------
    kind:
        One of the :class:`Kind` constants.
    session:
        Session id chosen by the client (stable across reconnects).
    client:
        The client's name (its token name on a real server).
    step:
        Monotonic step id within the session. A request whose step was already answered is
        answered again from the server's record and never applied twice.
    tensors:
        Name -> encoded frame bytes.
    meta:
        Name -> JSON-serialisable scalar, list or dict.
    """

    kind: str
    session: str = ""
    client: str = ""
    step: int = 0
    tensors: dict[str, bytes] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def tensor_bytes(self) -> int:
        """Bytes of the tensor frames this message carries (what byte counts report)."""
        return sum(len(b) for b in self.tensors.values())

    def frame(self, name: str) -> bytes:
        """The frame called ``name``; a :class:`ProtocolError` naming what was there if absent."""
        try:
            return self.tensors[name]
        except KeyError:
            have = ", ".join(sorted(self.tensors)) or "none"
            raise ProtocolError(
                f"{self.kind} message is missing tensor {name!r} (it carries: {have})"
            ) from None

    def meta_json(self) -> str:
        return json.dumps(self.meta, separators=(",", ":"), sort_keys=True)

    @staticmethod
    def meta_from_json(text: str) -> dict[str, Any]:
        return parse_meta(text)


def parse_meta(text: str, **hooks: Any) -> dict[str, Any]:
    """``meta_json`` text as a dict (``{}`` for ``""``); ``hooks`` go to :func:`json.loads`
    (a stricter reader passes ``parse_constant``, ``parse_float``, ``parse_int``).

    Raises
    ------
    ProtocolError
        Invalid JSON, nesting too deep for the parser, or a value that is not an object.
    """
    if not text:
        return {}
    try:
        value = json.loads(text, **hooks)
    except RecursionError:
        raise ProtocolError("message meta is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"message meta is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"message meta must be a JSON object, got {type(value).__name__}")
    return value


def error_message(request: Message, code: str, text: str) -> Message:
    """The reply that tells a client its request failed; ``code`` is a gRPC-style status name."""
    return Message(
        Kind.ERROR,
        request.session,
        request.client,
        request.step,
        meta={"code": code, "message": text},
    )


def expect(reply: Message, *kinds: str) -> Message:
    """Return ``reply`` if it is one of ``kinds``; turn an ERROR reply into a typed exception.

    Raises
    ------
    TrainingDiverged
        The server refused to apply a step whose loss or gradients were not finite.
    ProtocolError
        An ``INVALID_ARGUMENT`` error reply, or a reply of another kind.
    TransportError
        Any other error reply (``DEADLINE_EXCEEDED``, ...).
    """
    if reply.kind == Kind.ERROR:
        code = reply.meta.get("code", "UNKNOWN")
        text = reply.meta.get("message", "")
        if reply.meta.get("diverged"):
            raise TrainingDiverged(text)
        error = ProtocolError if code == "INVALID_ARGUMENT" else TransportError
        raise error(f"server refused step {reply.step}: {code}: {text}")
    if reply.kind not in kinds:
        raise ProtocolError(f"expected {' or '.join(kinds)} from the server, got {reply.kind!r}")
    return reply


def ids_digest(ids: np.ndarray) -> str:
    """A short digest of a batch's sample ids: vertical parties prove they hold the same samples
    in the same order without sending the ids (SHA-256 of little-endian int64, 16 hex digits)."""
    return hashlib.sha256(np.asarray(ids, dtype="<i8").tobytes()).hexdigest()[:16]


def message_to_dict(message: Message) -> dict[str, Any]:
    """A JSON-able dict of ``message`` (frames base64): how a server persists its records."""
    return {
        "kind": message.kind,
        "session": message.session,
        "client": message.client,
        "step": message.step,
        "meta": message.meta,
        "tensors": {n: base64.b64encode(f).decode() for n, f in message.tensors.items()},
    }


def message_from_dict(item: dict[str, Any]) -> Message:
    """The inverse of :func:`message_to_dict`."""
    return Message(
        item["kind"],
        item["session"],
        item["client"],
        int(item["step"]),
        {n: base64.b64decode(f) for n, f in item["tensors"].items()},
        item["meta"],
    )
