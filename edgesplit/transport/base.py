"""What a transport is: something that carries a request :class:`Message` to a server handler
and brings its reply back. The engine only ever talks to this interface."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from edgesplit.wire.messages import Message

#: A server-side handler: one request in, one reply out. It must never raise for bad input;
#: it returns a ``Kind.ERROR`` message instead so the server keeps serving everyone else.
Handler = Callable[[Message], Message]


class Transport(Protocol):
    """Client side of a connection to a split server.

    ``wire_bytes_up`` / ``wire_bytes_down`` count every serialised envelope sent and received
    (frames, names, ids and meta): what byte counts report.
    """

    @property
    def wire_bytes_up(self) -> int:
        """Bytes of every serialised request envelope sent so far."""
        ...

    @property
    def wire_bytes_down(self) -> int:
        """Bytes of every serialised reply envelope received so far."""
        ...

    def request(self, message: Message) -> Message:
        """Send one request and wait for its reply."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...
