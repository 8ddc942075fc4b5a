"""A stream leaves out what its earlier messages fixed: ids, and a kind that repeats."""

from __future__ import annotations

import pytest

from edgesplit.errors import ProtocolError
from edgesplit.transport.envelope import (
    StreamIds,
    envelope_to_message,
    message_to_envelope,
    parse_envelope,
)
from edgesplit.transport.inprocess import InProcessTransport
from edgesplit.wire.messages import Kind, Message


def wire(sender: StreamIds, receiver: StreamIds, message: Message) -> tuple[int, Message]:
    data = message_to_envelope(sender.compact(message)).SerializeToString()
    got = receiver.complete(envelope_to_message(parse_envelope(data), kind_from_stream=True))
    return len(data), got


def test_a_repeated_kind_is_sent_once_and_restored() -> None:
    client, server = StreamIds(), StreamIds()
    kinds = [Kind.HELLO, Kind.FORWARD, Kind.FORWARD, Kind.PREDICT, Kind.FORWARD, Kind.FORWARD]
    sizes = []
    for step, kind in enumerate(kinds):
        size, got = wire(client, server, Message(kind, "sess", "c", step, {"act": b"x"}))
        assert (got.kind, got.session, got.client, got.step) == (kind, "sess", "c", step)
        sizes.append(size)
    # the second forward in a row saves its kind (2 + 7 bytes); a kind change costs it again
    assert sizes[2] == sizes[1] - 2 - len(Kind.FORWARD)
    assert sizes[4] > sizes[5]


def test_replies_and_requests_keep_their_own_last_kind() -> None:
    transport = InProcessTransport(
        lambda m: Message(Kind.GRADIENT, m.session, m.client, m.step, {"grad": b"g"})
    )
    first = transport.request(Message(Kind.FORWARD, "s", "c", 1, {"act": b"a"}))
    up, down = transport.wire_bytes_up, transport.wire_bytes_down
    second = transport.request(Message(Kind.FORWARD, "s", "c", 2, {"act": b"a"}))
    assert first.kind == second.kind == Kind.GRADIENT
    # both directions dropped their repeated kind (and the ids fixed by the first request)
    assert transport.wire_bytes_up - up < up
    assert transport.wire_bytes_down - down < down


def test_an_empty_kind_with_nothing_before_it_is_refused() -> None:
    data = message_to_envelope(Message("", "s", "c", 1)).SerializeToString()
    envelope = parse_envelope(data)
    with pytest.raises(ProtocolError, match="empty kind"):
        envelope_to_message(envelope)  # outside a stream: always refused
    with pytest.raises(ProtocolError, match="first message of a stream must name its kind"):
        StreamIds().complete(envelope_to_message(envelope, kind_from_stream=True))
