"""Conversion between protocol :class:`Message` objects and the gRPC ``Envelope``.

The two are field-for-field the same; only ``meta`` changes shape (a dict here, a JSON string on
the wire) and ``tensors`` (a dict here, an ordered list of ``Tensor{name, frame}`` on the wire).
Everything coming off the wire is checked here so the engine never sees a message whose
shape is wrong: duplicate tensor names or meta that is not a JSON object are a
:class:`~edgesplit.errors.ProtocolError`.

An envelope larger than one gRPC message travels as *chunks* (:func:`split_envelope`,
:class:`ChunkAssembler`): its serialized bytes cut into pieces, each sent as an ``Envelope`` that
carries only ``chunk``. Envelopes that fit one message are sent whole, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from google.protobuf.message import DecodeError

from edgesplit.errors import ConfigError, ProtocolError
from edgesplit.transport import split_pb2
from edgesplit.wire.messages import Message, parse_meta

#: Largest step id the wire can carry (the proto field is a uint64).
MAX_STEP = 2**64 - 1
#: Default of :attr:`EnvelopeLimits.max_envelope_bytes` (and of a client's bound on replies).
DEFAULT_MAX_ENVELOPE_BYTES = 256 * 1024 * 1024
#: Bytes a chunk carrier adds around its piece: field tags and varints take at most 36; the
#: rest is margin, so a carrier of a ``max_message_bytes`` split never exceeds that limit.
CHUNK_OVERHEAD = 64


@dataclass(frozen=True)
class EnvelopeLimits:
    """What a server accepts in one request envelope beyond gRPC's message size limit.

    Parameters
    ----------
    max_meta_bytes:
        Longest ``meta_json`` (UTF-8 bytes). Meta carries a handful of small fields; a large one
        would only pin server memory.
    max_tensors:
        Most tensors in one envelope.
    max_name_bytes:
        Longest ``kind``, ``session``, ``client`` or tensor name.
    max_envelope_bytes:
        Largest serialized request envelope, whole or joined from chunks. A chunked request
        declares its size in its first piece, so an oversized one is refused before its bytes
        are held.
    """

    max_meta_bytes: int = 64 * 1024
    max_tensors: int = 64
    max_name_bytes: int = 256
    max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES

    def __post_init__(self) -> None:
        for name in ("max_meta_bytes", "max_tensors", "max_name_bytes", "max_envelope_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"envelope limit {name} must be positive, got {getattr(self, name)}"
                )


def parse_envelope(data: bytes) -> split_pb2.Envelope:
    """Decode the protobuf bytes of one envelope.

    Raises
    ------
    ProtocolError
        If the bytes are not an ``Envelope`` (gRPC itself would answer INTERNAL).
    """
    try:
        return split_pb2.Envelope.FromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ProtocolError(
            f"request is not a protobuf edgesplit.v1.Envelope ({len(data)} bytes): {exc}"
        ) from None


def _no_constant(name: str) -> Any:
    raise ProtocolError(f"message meta contains {name}; meta numbers must be finite JSON numbers")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ProtocolError(
            f"message meta number {text[:40]} overflows a 64-bit float; meta numbers must be finite"
        )
    return value


def _bounded_int(text: str) -> int:
    # 20 digits hold every uint64; a longer integer is never a valid field and huge ones make
    # later float() calls overflow.
    if len(text.lstrip("-")) > 20:
        raise ProtocolError(
            f"message meta integer {text[:24]}... has {len(text.lstrip('-'))} digits; "
            "meta integers must fit in 64 bits"
        )
    return int(text)


#: Deepest nesting of objects/arrays accepted in meta (the protocol uses 2).
MAX_META_DEPTH = 32


def _nesting(text: str) -> int:
    """Deepest ``{``/``[`` nesting of a JSON text, ignoring brackets inside strings."""
    if text.count("{") + text.count("[") <= MAX_META_DEPTH:
        return 0  # cannot be deeper than the bracket count; skip the scan
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "}]":
            depth -= 1
    return deepest


def strict_meta(text: str, limit: int) -> dict[str, Any]:
    """``meta_json`` as a dict, refusing what the protocol never sends.

    Refused: more than ``limit`` bytes, invalid JSON, a non-object, ``NaN``/``Infinity``, a float
    that overflows (``1e400``), an integer beyond 64 bits, nesting deeper than
    :data:`MAX_META_DEPTH`.

    Raises
    ------
    ProtocolError
        Naming what was wrong.
    """
    if not text:
        return {}
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise ProtocolError(f"message meta is {size} bytes; the server accepts at most {limit}")
    depth = _nesting(text)
    if depth > MAX_META_DEPTH:
        # Checked before parsing: json recursing near Python's limit is slow, and a garbage
        # collection that runs down there fails in finalizers ("Exception ignored ...").
        raise ProtocolError(
            f"message meta is nested {depth} levels deep; the server accepts at most "
            f"{MAX_META_DEPTH}"
        )
    return parse_meta(
        text, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_bounded_int
    )


def message_to_envelope(message: Message) -> split_pb2.Envelope:
    """The wire form of ``message``.

    Raises
    ------
    ProtocolError
        If the step is outside ``0 .. 2**64-1`` or a tensor is not ``bytes``.
    """
    if not 0 <= message.step <= MAX_STEP:
        raise ProtocolError(
            f"{message.kind} message has step {message.step}; steps are integers in 0..2**64-1"
        )
    tensors = []
    for name, frame in message.tensors.items():
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            raise ProtocolError(
                f"tensor {name!r} of a {message.kind} message is a {type(frame).__name__}, "
                "not encoded frame bytes (encode it with edgesplit.wire.frame.encode_frame)"
            )
        tensors.append(split_pb2.Tensor(name=name, frame=bytes(frame)))
    return split_pb2.Envelope(
        kind=message.kind,
        session=message.session,
        client=message.client,
        step=message.step,
        tensors=tensors,
        meta_json=message.meta_json() if message.meta else "",
    )


def envelope_to_message(
    envelope: split_pb2.Envelope,
    limits: EnvelopeLimits | None = None,
    *,
    kind_from_stream: bool = False,
) -> Message:
    """The :class:`Message` an envelope carries.

    Parameters
    ----------
    envelope:
        As received.
    limits:
        A server passes its limits: meta is then parsed strictly (:func:`strict_meta`) and the
        tensor count and name lengths are capped. ``None`` (a client reading replies) checks
        only the structure.
    kind_from_stream:
        An empty kind means "the kind of the previous message on this stream": the caller
        fills it with :meth:`StreamIds.complete`.

    Raises
    ------
    ProtocolError
        If the kind is empty, two tensors share a name, ``meta_json`` is not a JSON object, or
        (with ``limits``) a limit is exceeded or meta holds a non-finite number.
    """
    if not envelope.kind and not kind_from_stream:
        raise ProtocolError("envelope has an empty kind")
    if limits is not None:
        _check_limits(envelope, limits)
    tensors: dict[str, bytes] = {}
    for tensor in envelope.tensors:
        # A map would silently keep the last duplicate; refuse instead, since two frames under
        # one name means the sender is confused about what it sent.
        if tensor.name in tensors:
            raise ProtocolError(f"{envelope.kind} envelope carries tensor {tensor.name!r} twice")
        tensors[tensor.name] = tensor.frame
    return Message(
        kind=envelope.kind,
        session=envelope.session,
        client=envelope.client,
        step=envelope.step,
        tensors=tensors,
        meta=(
            strict_meta(envelope.meta_json, limits.max_meta_bytes)
            if limits is not None
            else Message.meta_from_json(envelope.meta_json)
        ),
    )


def _check_limits(envelope: split_pb2.Envelope, limits: EnvelopeLimits) -> None:
    if len(envelope.tensors) > limits.max_tensors:
        raise ProtocolError(
            f"{envelope.kind[:40]} envelope carries {len(envelope.tensors)} tensors; "
            f"the server accepts at most {limits.max_tensors}"
        )
    names = [("kind", envelope.kind), ("session", envelope.session), ("client", envelope.client)]
    names += [("tensor name", t.name) for t in envelope.tensors]
    for field, value in names:
        if len(value.encode("utf-8", "surrogatepass")) > limits.max_name_bytes:
            raise ProtocolError(
                f"envelope {field} is {len(value)} characters long; the server accepts at most "
                f"{limits.max_name_bytes} bytes"
            )


@dataclass
class StreamIds:
    """What a stream's earlier messages fixed: its session and client, and the last kind each
    way.

    The session and client are fixed for the life of a stream, so only its first request
    carries them; later requests and every reply leave them empty on the wire (about 25 bytes a
    message). A message of the same kind as the previous one in its direction (a training
    step's ``forward`` after ``forward``, ``gradient`` after ``gradient``) leaves its kind empty
    too (9-10 bytes). Together a byte a sample at 100× compression. Each end keeps one
    ``StreamIds`` per stream: the sender calls :meth:`compact` before serialising, the receiver
    :meth:`complete` after parsing (with ``kind_from_stream``). A message naming a *different*
    session or client keeps its own (it is sent in full).
    """

    session: str | None = None
    client: str | None = None
    #: Kind of the last message this end compacted (sent) and completed (received).
    sent_kind: str | None = None
    received_kind: str | None = None

    def _bind(self, message: Message) -> bool:
        if self.session is None and message.session:
            self.session, self.client = message.session, message.client
            return True
        return False

    def compact(self, message: Message) -> Message:
        """``message`` as it goes on the wire: what the stream fixed left out."""
        kind = "" if message.kind == self.sent_kind else message.kind
        self.sent_kind = message.kind
        if self._bind(message) or self.session is None:
            return replace(message, kind=kind) if kind != message.kind else message
        return replace(
            message,
            kind=kind,
            session="" if message.session == self.session else message.session,
            client="" if message.client == self.client else message.client,
        )

    def complete(self, message: Message) -> Message:
        """``message`` as received, with what the stream fixed filled in.

        Raises
        ------
        ProtocolError
            If the kind is empty and no earlier message on the stream gave one.
        """
        if not message.kind:
            if self.received_kind is None:
                raise ProtocolError(
                    "envelope has an empty kind, and no earlier message on this stream named "
                    "one; the first message of a stream must name its kind"
                )
            message.kind = self.received_kind
        self.received_kind = message.kind
        if self._bind(message) or self.session is None:
            return message
        message.session = message.session or self.session
        message.client = message.client or (self.client or "")
        return message


def wire_size(message: Message) -> int:
    """Bytes of ``message``'s serialised envelope (what a byte count reports)."""
    return int(message_to_envelope(message).ByteSize())


class ChunkError(ProtocolError):
    """Chunk carriers that do not join into one envelope: a piece missing, out of order, empty,
    inconsistent with the first, or mixed with other envelopes."""


class EnvelopeTooLarge(ChunkError):
    """An envelope (whole or declared by its first chunk) over the receiver's byte bound."""


def split_envelope(envelope: split_pb2.Envelope, max_message_bytes: int) -> list[bytes]:
    """``envelope`` serialized as the gRPC messages that carry it: one when it fits in
    ``max_message_bytes``, else chunk carriers of at most that many bytes each.

    The lengths of the returned byte strings are what crosses the wire (byte counts).

    Raises
    ------
    ConfigError
        If ``max_message_bytes`` leaves no room for a piece beside :data:`CHUNK_OVERHEAD`.
    """
    return split_serialized(envelope.SerializeToString(), max_message_bytes)


def split_serialized(data: bytes, max_message_bytes: int) -> list[bytes]:
    """:func:`split_envelope` for an envelope already serialized to ``data``.

    Raises
    ------
    ConfigError
        If ``max_message_bytes`` leaves no room for a piece beside :data:`CHUNK_OVERHEAD`.
    """
    size = len(data)
    if size <= max_message_bytes:
        return [data]
    piece = max_message_bytes - CHUNK_OVERHEAD
    if piece <= 0:
        raise ConfigError(
            f"max_message_bytes={max_message_bytes} leaves no room for chunks of a {size}-byte "
            f"envelope; it must exceed {CHUNK_OVERHEAD}"
        )
    view = memoryview(data)
    count = -(-size // piece)
    return [chunk_carrier(i, count, size, view[i * piece : (i + 1) * piece]) for i in range(count)]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def chunk_carrier(index: int, count: int, total: int, piece: bytes | memoryview) -> bytes:
    """The serialized ``Envelope{chunk: Chunk{index, count, total, data: piece}}``.

    Encoded by hand (field 7 holding fields 1-4, proto3: a zero ``index`` is left out), byte for
    byte what protobuf writes: building it through protobuf objects copies a 64 MiB piece three
    times (into the message, into its parent, out again); this copies it once.
    """
    head = bytearray()
    if index:
        head += b"\x08" + _varint(index)
    head += b"\x10" + _varint(count) + b"\x18" + _varint(total) + b"\x22" + _varint(len(piece))
    return b"".join((b"\x3a", _varint(len(head) + len(piece)), head, piece))


class ChunkAssembler:
    """Joins the chunk carriers of one stream into envelopes (one per stream and direction).

    Parameters
    ----------
    max_envelope_bytes:
        Largest joined envelope; a first chunk declaring more is refused before any of its
        bytes are kept.
    what:
        "request" or "reply", for messages.
    """

    def __init__(self, max_envelope_bytes: int, what: str = "request") -> None:
        self.max_envelope_bytes = max_envelope_bytes
        self._what = what
        # Pieces kept as received and joined once at the end: one copy of the envelope, not
        # one per piece (at 64 MiB every copy counts).
        self._pieces: list[bytes] = []
        self._held = 0
        self._count = 0
        self._total = 0
        self._next = 0  # index of the expected piece; 0 when no envelope is half received

    @property
    def pending_bytes(self) -> int:
        """Bytes of a half-received chunked envelope held now."""
        return self._held

    def reset(self) -> None:
        """Drop a half-received envelope (the stream ended, or it was refused)."""
        self._pieces = []
        self._held = self._next = self._count = self._total = 0

    def feed(self, envelope: split_pb2.Envelope) -> split_pb2.Envelope | None:
        """The envelope that ``envelope`` completes: itself when it is whole, the joined
        envelope after the last chunk, ``None`` while chunks are still to come.

        Raises
        ------
        ChunkError
            A chunk out of order, missing, empty, inconsistent with the first, carrying other
            fields, or a whole envelope arriving between chunks; or joined bytes that are not
            an envelope, or are themselves a chunk. What was held is dropped.
        EnvelopeTooLarge
            A first chunk declaring more than ``max_envelope_bytes``.
        """
        try:
            return self._feed(envelope)
        except ProtocolError:
            self.reset()
            raise

    def _feed(self, envelope: split_pb2.Envelope) -> split_pb2.Envelope | None:
        if not envelope.HasField("chunk"):
            if self._next:
                raise ChunkError(
                    f"a whole {self._what} envelope arrived while chunk {self._next} of "
                    f"{self._count} was expected; the chunks of one envelope come back to back"
                )
            return envelope
        chunk = envelope.chunk
        _carrier_only(envelope)
        if chunk.index != self._next:
            expected = (
                f"chunk {self._next} of {self._count}"
                if self._next
                else "chunk 0 of a new envelope"
            )
            raise ChunkError(
                f"{self._what} chunk {chunk.index} arrived where {expected} was expected; "
                "chunks must come in order 0..count-1 with none missing"
            )
        if chunk.index == 0:
            self._start(chunk)
        elif chunk.count != self._count or chunk.total != self._total:
            raise ChunkError(
                f"{self._what} chunk {chunk.index} says count={chunk.count} total={chunk.total}; "
                f"chunk 0 said count={self._count} total={self._total} (they must agree)"
            )
        data = chunk.data
        if not data:
            raise ChunkError(f"{self._what} chunk {chunk.index} of {self._count} is empty")
        if self._held + len(data) > self._total:
            raise ChunkError(
                f"{self._what} chunks carry more than the {self._total} bytes chunk 0 declared "
                f"(at chunk {chunk.index} of {self._count})"
            )
        self._pieces.append(data)
        self._held += len(data)
        self._next += 1
        if self._next < self._count:
            return None
        if self._held != self._total:
            raise ChunkError(
                f"{self._what} chunks add up to {self._held} bytes; chunk 0 declared {self._total}"
            )
        pieces = self._pieces
        self.reset()
        joined = parse_envelope(b"".join(pieces))
        if joined.HasField("chunk"):
            raise ChunkError(f"joined {self._what} chunks hold another chunk; chunks do not nest")
        return joined

    def _start(self, chunk: split_pb2.Chunk) -> None:
        if chunk.count < 2:
            raise ChunkError(
                f"{self._what} chunk 0 says count={chunk.count}; a chunked envelope has at least "
                "2 pieces (send an envelope that fits one message whole)"
            )
        if chunk.total > self.max_envelope_bytes:
            raise EnvelopeTooLarge(
                f"chunked {self._what} declares {chunk.total} bytes, over the limit of "
                f"{self.max_envelope_bytes} bytes (max_envelope_bytes)"
            )
        if chunk.count > chunk.total:
            raise ChunkError(
                f"{self._what} chunk 0 says count={chunk.count} for total={chunk.total} bytes; "
                "every piece carries at least one byte"
            )
        self._count, self._total = chunk.count, chunk.total


def _carrier_only(envelope: split_pb2.Envelope) -> None:
    """Refuse a chunk carrier that sets anything besides ``chunk`` (checked field by field:
    ``ListFields`` would copy the piece's bytes)."""
    others = [
        name
        for name, value in (
            ("kind", envelope.kind),
            ("session", envelope.session),
            ("client", envelope.client),
            ("step", envelope.step),
            ("tensors", len(envelope.tensors)),
            ("meta_json", envelope.meta_json),
        )
        if value
    ]
    if others:
        raise ChunkError(
            f"a chunk carrier may set only 'chunk'; this one also sets {', '.join(others)}"
        )
