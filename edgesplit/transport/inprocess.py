"""In-process transport: the same messages and the same encoded bytes as gRPC, no sockets.

It copies every frame on the way in and out, so neither side can share memory with the other —
what the server sees is only what crossed as bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgesplit.transport.base import Handler
from edgesplit.wire.messages import Message


def _copy(message: Message) -> Message:
    return Message(
        message.kind,
        message.session,
        message.client,
        message.step,
        {name: bytes(frame) for name, frame in message.tensors.items()},
        Message.meta_from_json(message.meta_json()),
    )


@dataclass
class InProcessTransport:
    """Calls ``handler`` directly. Counts tensor bytes in each direction."""

    handler: Handler
    bytes_up: int = 0
    bytes_down: int = 0
    messages: int = field(default=0)

    def request(self, message: Message) -> Message:
        sent = _copy(message)
        self.bytes_up += sent.tensor_bytes()
        reply = _copy(self.handler(sent))
        self.bytes_down += reply.tensor_bytes()
        self.messages += 1
        return reply

    def close(self) -> None:
        pass
