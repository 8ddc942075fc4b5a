"""Conversion between protocol :class:`Message` objects and the gRPC ``Envelope``.

The two are field-for-field the same; only ``meta`` changes shape (a dict here, a JSON string on
the wire) and ``tensors`` (a dict here, an ordered list of ``Tensor{name, frame}`` on the wire).
Everything coming off the wire is checked here so the engine never sees a message whose
shape is wrong: duplicate tensor names or meta that is not a JSON object are a
:class:`~edgesplit.errors.ProtocolError`.
"""

from __future__ import annotations

from edgesplit.errors import ProtocolError
from edgesplit.transport import split_pb2
from edgesplit.wire.messages import Message

#: Largest step id the wire can carry (the proto field is a uint64).
MAX_STEP = 2**64 - 1


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


def envelope_to_message(envelope: split_pb2.Envelope) -> Message:
    """The :class:`Message` an envelope carries.

    Raises
    ------
    ProtocolError
        If the kind is empty, two tensors share a name, or ``meta_json`` is not a JSON object.
    """
    if not envelope.kind:
        raise ProtocolError("envelope has an empty kind")
    tensors: dict[str, bytes] = {}
    for tensor in envelope.tensors:
        # A map would silently keep the last duplicate; refuse instead, since two frames under
        # one name means the sender is confused about what it sent.
        if tensor.name in tensors:
            raise ProtocolError(
                f"{envelope.kind} envelope carries tensor {tensor.name!r} twice"
            )
        tensors[tensor.name] = tensor.frame
    return Message(
        kind=envelope.kind,
        session=envelope.session,
        client=envelope.client,
        step=envelope.step,
        tensors=tensors,
        meta=Message.meta_from_json(envelope.meta_json),
    )
