"""In-process transport: the same messages and the same encoded bytes as gRPC, no sockets.

Every request and reply is serialised to the same protobuf envelope gRPC sends (with the same
per-stream compaction of session and client ids, :class:`~edgesplit.transport.envelope.StreamIds`)
and parsed back, so neither side can share memory with the other, what the server sees is only
what crossed as bytes, and the byte counts are the lengths of those envelopes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgesplit.transport.base import Handler
from edgesplit.transport.envelope import (
    StreamIds,
    envelope_to_message,
    message_to_envelope,
    parse_envelope,
)
from edgesplit.wire.messages import Message


@dataclass
class InProcessTransport:
    """Calls ``handler`` directly, through serialised envelopes. Counts wire bytes each way
    (``wire_bytes_*``: envelopes, frames included) and frame bytes (``bytes_*``)."""

    handler: Handler
    bytes_up: int = 0
    bytes_down: int = 0
    wire_bytes_up: int = 0
    wire_bytes_down: int = 0
    messages: int = field(default=0)
    _client_ids: StreamIds = field(default_factory=StreamIds, repr=False)
    _server_ids: StreamIds = field(default_factory=StreamIds, repr=False)

    def request(self, message: Message) -> Message:
        up = message_to_envelope(self._client_ids.compact(message)).SerializeToString()
        self.wire_bytes_up += len(up)
        sent = self._server_ids.complete(
            envelope_to_message(parse_envelope(up), kind_from_stream=True)
        )
        self.bytes_up += sent.tensor_bytes()
        reply = self.handler(sent)
        down = message_to_envelope(self._server_ids.compact(reply)).SerializeToString()
        self.wire_bytes_down += len(down)
        received = self._client_ids.complete(
            envelope_to_message(parse_envelope(down), kind_from_stream=True)
        )
        self.bytes_down += received.tensor_bytes()
        self.messages += 1
        return received

    def close(self) -> None:
        pass
