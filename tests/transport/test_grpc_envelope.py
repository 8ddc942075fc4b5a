"""Message <-> Envelope: a lossless round trip, and malformed envelopes are ProtocolErrors."""

from __future__ import annotations

import pytest

from edgesplit.errors import ProtocolError
from edgesplit.transport import split_pb2
from edgesplit.transport.envelope import MAX_STEP, envelope_to_message, message_to_envelope
from edgesplit.wire.messages import Kind, Message


def test_round_trip_keeps_every_field_and_tensor_order() -> None:
    msg = Message(
        Kind.WEIGHTS, "sess", "edge-1", MAX_STEP,
        {"z.weight": b"\x00\x01", "a.bias": b"", "m": bytes(range(256))},
        {"round": 3, "n_samples": 128, "nested": {"x": [1.5, None, "y"]}},
    )
    wire = message_to_envelope(msg).SerializeToString()
    back = envelope_to_message(split_pb2.Envelope.FromString(wire))
    assert back == msg
    assert list(back.tensors) == ["z.weight", "a.bias", "m"]


def test_empty_meta_travels_as_empty_string() -> None:
    env = message_to_envelope(Message(Kind.BYE, "s", "c", 0))
    assert env.meta_json == ""
    assert envelope_to_message(env).meta == {}


@pytest.mark.parametrize("step", [-1, MAX_STEP + 1])
def test_step_out_of_range(step: int) -> None:
    with pytest.raises(ProtocolError, match="steps are integers"):
        message_to_envelope(Message(Kind.FORWARD, step=step))


def test_tensor_must_be_bytes() -> None:
    with pytest.raises(ProtocolError, match="not encoded frame bytes"):
        message_to_envelope(Message(Kind.FORWARD, tensors={"act": [1, 2, 3]}))  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("envelope", "words"),
    [
        (split_pb2.Envelope(kind=""), "empty kind"),
        (split_pb2.Envelope(kind="forward", tensors=[split_pb2.Tensor(name="act", frame=b"1"),
                                                     split_pb2.Tensor(name="act", frame=b"2")]),
         "tensor 'act' twice"),
        (split_pb2.Envelope(kind="forward", meta_json="{not json"), "not valid JSON"),
        (split_pb2.Envelope(kind="forward", meta_json="[1, 2]"), "must be a JSON object"),
    ],
)
def test_malformed_envelopes(envelope: split_pb2.Envelope, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        envelope_to_message(envelope)
