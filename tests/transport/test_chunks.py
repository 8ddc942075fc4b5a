"""Envelopes larger than one gRPC message travel as chunks (issue 9, defect 3): requests and
replies over ``max_message_bytes`` round-trip over a real server, byte counts are the chunk
carriers as sent, and chunk sequences that do not join are refused without disturbing anyone."""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from edgesplit.errors import ConfigError, ProtocolError, TransportError
from edgesplit.transport import split_pb2
from edgesplit.transport.envelope import (
    CHUNK_OVERHEAD,
    ChunkAssembler,
    ChunkError,
    EnvelopeLimits,
    EnvelopeTooLarge,
    StreamIds,
    message_to_envelope,
    parse_envelope,
    split_envelope,
)
from edgesplit.transport.grpc_client import GrpcTransport, RetryPolicy
from edgesplit.transport.grpc_server import RunningServer, SessionLimits, serve_handler
from edgesplit.wire.frame import FrameLimits, decode_frame, encode_frame
from edgesplit.wire.messages import Kind, Message

TOKENS = {"alice": "tok-alice-0123456789abcd", "mallory": "tok-mallory-0123456789ab"}
LIMIT = 64 * 1024  # max_message_bytes of the small servers below
NO_RETRY = RetryPolicy(attempts=0)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def echo_big(message: Message) -> Message:
    """Says what it received (sizes, digests) and answers with a reply of ``meta.reply`` bytes."""
    n = int(message.meta.get("reply", 0))
    tensors = {"grad": bytes(range(256)) * (n // 256) + b"\x07" * (n % 256)} if n else {}
    got = {name: [len(b), digest(b)] for name, b in message.tensors.items()}
    return Message(
        Kind.GRADIENT, message.session, message.client, message.step, tensors, {"got": got}
    )


@pytest.fixture
def server() -> Iterator[RunningServer]:
    srv = serve_handler(
        echo_big,
        "127.0.0.1",
        0,
        tokens=TOKENS,
        max_message_bytes=LIMIT,
        limits=SessionLimits(envelope=EnvelopeLimits(max_envelope_bytes=1 << 20)),
    )
    yield srv
    srv.stop(None)


def connect(srv: RunningServer, name: str = "alice", **kw: int) -> GrpcTransport:
    return GrpcTransport(
        srv.address, TOKENS[name], max_message_bytes=LIMIT, retry=NO_RETRY, timeout=30, **kw
    )


def carriers(message: Message, limit: int = LIMIT) -> list[bytes]:
    """What a fresh stream sends for ``message`` as its first request."""
    return split_envelope(message_to_envelope(StreamIds().compact(message)), limit)


# -- split and join -------------------------------------------------------------------------


def test_split_and_join_round_trip() -> None:
    message = Message(Kind.FORWARD, "s", "c", 3, {"act": bytes(range(256)) * 1000}, {"n": 1})
    whole = message_to_envelope(message)
    data = whole.SerializeToString()
    assert split_envelope(whole, len(data)) == [data]  # fits: sent as it is
    pieces = split_envelope(whole, 10_000)
    assert len(pieces) == -(-len(data) // (10_000 - CHUNK_OVERHEAD)) > 2
    assert all(len(p) <= 10_000 for p in pieces)
    parsed = [parse_envelope(p) for p in pieces]
    # the hand-encoded carriers are byte for byte what protobuf writes
    assert [p.SerializeToString() for p in parsed] == pieces
    assert [p.chunk.index for p in parsed] == list(range(len(pieces)))
    assert {(p.chunk.count, p.chunk.total) for p in parsed} == {(len(pieces), len(data))}
    joiner = ChunkAssembler(1 << 20)
    assert [joiner.feed(p) for p in parsed[:-1]] == [None] * (len(pieces) - 1)
    assert joiner.pending_bytes > 0
    assert joiner.feed(parsed[-1]) == whole
    assert joiner.pending_bytes == 0
    assert joiner.feed(whole) == whole  # and a whole one after it passes


def test_a_realistic_cnn_cut_goes_both_ways(server: RunningServer) -> None:
    # a ResNet cut at 224x224: 64 x 56 x 56 float32 per sample, a batch of 2: 1.6 MB per frame,
    # 25x this server's message limit
    act = np.random.default_rng(0).standard_normal((2, 64, 56, 56)).astype(np.float32)
    frame = encode_frame(act, "fp32")
    assert len(frame) > 20 * LIMIT
    limits = SessionLimits(envelope=EnvelopeLimits(max_envelope_bytes=8 << 20))

    def grad_of(message: Message) -> Message:
        x = decode_frame(message.frame("act"))  # the server decodes what it was sent
        return Message(
            Kind.GRADIENT,
            message.session,
            message.client,
            message.step,
            {"grad": encode_frame(-x, "fp32")},
        )

    srv = serve_handler(
        grad_of, "127.0.0.1", 0, tokens=TOKENS, max_message_bytes=LIMIT, limits=limits
    )
    try:
        with connect(srv, max_envelope_bytes=8 << 20) as t:
            reply = t.request(Message(Kind.FORWARD, "s", "", 1, {"act": frame}))
        np.testing.assert_array_equal(decode_frame(reply.frame("grad")), -act)
    finally:
        srv.stop(None)


def test_request_and_reply_over_the_message_limit_round_trip(server: RunningServer) -> None:
    payload = np.random.default_rng(1).bytes(3 * LIMIT + 123)
    message = Message(Kind.FORWARD, "s", "", 1, {"act": payload}, {"reply": 2 * LIMIT + 7})
    with connect(server) as t:
        reply = t.request(message)
        assert reply.meta["got"] == {"act": [len(payload), digest(payload)]}
        assert len(reply.frame("grad")) == 2 * LIMIT + 7
        assert reply.session == "s" and reply.step == 1
        # byte counts: the chunk carriers as they went on the wire, each under the limit
        up = carriers(message)
        assert len(up) == 4 and t.wire_bytes_up == sum(len(p) for p in up)
        # the server's stream ids are the first request's (client "": the token names it)
        down_pieces = split_envelope(
            message_to_envelope(StreamIds(session="s", client="").compact(reply)), LIMIT
        )
        assert len(down_pieces) == 3
        assert t.wire_bytes_down == sum(len(p) for p in down_pieces)
        assert t.bytes_up == len(payload) and t.bytes_down == 2 * LIMIT + 7
        # a small request on the same stream afterwards goes whole
        before = t.wire_bytes_up
        small = Message(Kind.FORWARD, "s", "", 2, {"act": b"abc"})
        assert t.request(small).meta["got"] == {"act": [3, digest(b"abc")]}
        assert (
            t.wire_bytes_up - before
            # (its kind is the previous request's: left out too)
            == message_to_envelope(
                StreamIds(session="s", client="", sent_kind=Kind.FORWARD).compact(small)
            ).ByteSize()
        )


def test_the_issue_reproducer_a_64_mib_reply_with_default_limits() -> None:
    # A frame decoding to exactly serve's default 64 MiB tensor limit (--max-tensor-mib 64):
    # its envelope is over the default 64 MiB message limit, which used to fail the reply
    # after the step was applied.
    elements = 64 << 18
    big = encode_frame(np.zeros(elements, np.float32), "fp32")
    assert len(big) > 64 << 20
    serve_limits = FrameLimits(max_elements=elements, max_decoded_bytes=64 << 20)

    def answer(message: Message) -> Message:
        return Message(
            Kind.GRADIENT,
            message.session,
            message.client,
            message.step,
            {"grad": message.frame("act")},
        )

    srv = serve_handler(answer, "127.0.0.1", 0, tokens=TOKENS)
    try:
        with GrpcTransport(srv.address, TOKENS["alice"], retry=NO_RETRY, timeout=120) as t:
            reply = t.request(Message(Kind.FORWARD, "s", "", 1, {"act": big}))
        assert reply.frame("grad") == big
        assert decode_frame(reply.frame("grad"), limits=serve_limits).size == elements
    finally:
        srv.stop(None)


def test_a_client_bounds_the_replies_it_joins(server: RunningServer) -> None:
    with (
        connect(server, max_envelope_bytes=LIMIT * 2) as t,
        pytest.raises(ProtocolError, match="max_envelope_bytes"),
    ):
        t.request(Message(Kind.FORWARD, "s", "", 1, {}, {"reply": 3 * LIMIT}))


def test_a_request_over_the_servers_envelope_bound_is_refused(server: RunningServer) -> None:
    # the client allows 4 MiB, the server 1 MiB: refused on chunk 0, RESOURCE_EXHAUSTED
    with (
        connect(server, max_envelope_bytes=4 << 20) as t,
        pytest.raises(TransportError, match="RESOURCE_EXHAUSTED.*max_envelope_bytes"),
    ):
        t.request(Message(Kind.FORWARD, "s", "", 1, {"act": bytes(2 << 20)}))


# -- corrupt chunk sequences over a real server ---------------------------------------------


class RawStream:
    """A Session stream driven by hand with raw envelopes."""

    def __init__(self, srv: RunningServer, channel: grpc.Channel, name: str = "mallory") -> None:
        self._requests: queue.Queue[bytes | None] = queue.Queue()
        call = channel.stream_stream(
            "/edgesplit.v1.Split/Session",
            request_serializer=None,
            response_deserializer=split_pb2.Envelope.FromString,
        )
        self.call = call(
            iter(self._requests.get, None), metadata=[("authorization", f"Bearer {TOKENS[name]}")]
        )

    def send(self, *envelopes: split_pb2.Envelope | bytes) -> None:
        for e in envelopes:
            self._requests.put(e if isinstance(e, bytes) else e.SerializeToString())

    def end(self) -> grpc.RpcError:
        try:
            for _ in self.call:
                pass
        except grpc.RpcError as exc:
            return exc
        raise AssertionError("the stream ended without an error status")

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()


def chunk(index: int, count: int, total: int, data: bytes, **fields: object) -> split_pb2.Envelope:
    return split_pb2.Envelope(
        chunk=split_pb2.Chunk(index=index, count=count, total=total, data=data), **fields
    )


GOOD = carriers(Message(Kind.FORWARD, "s", "", 1, {"act": bytes(2 * LIMIT)}))
WHOLE = split_pb2.Envelope(kind="forward", session="s", step=1)
NOT_AN_ENVELOPE = b"\xff" * 100
NESTED = chunk(0, 2, 10, b"x" * 10).SerializeToString()


@pytest.mark.parametrize(
    ("sequence", "words"),
    [
        pytest.param([GOOD[1]], "chunk 1 arrived where chunk 0 of a new envelope", id="no-start"),
        pytest.param([GOOD[0], GOOD[2]], "chunk 2 arrived where chunk 1 of 3", id="missing"),
        pytest.param([GOOD[0], GOOD[0]], "chunk 0 arrived where chunk 1 of 3", id="repeated"),
        pytest.param(
            [GOOD[0], WHOLE], "whole request envelope arrived while chunk 1 of 3", id="interleaved"
        ),
        pytest.param([chunk(0, 1, 5, b"hello")], "at least 2 pieces", id="count-1"),
        pytest.param(
            [chunk(0, 2, 4, b"ab"), chunk(1, 3, 4, b"cd")], "must agree", id="count-changes"
        ),
        pytest.param(
            [chunk(0, 2, 4, b"ab"), chunk(1, 2, 4, b"c")], "add up to 3 bytes", id="short"
        ),
        pytest.param(
            [chunk(0, 2, 4, b"ab"), chunk(1, 2, 4, b"cde")], "more than the 4 bytes", id="long"
        ),
        pytest.param([chunk(0, 2, 4, b"")], "is empty", id="empty"),
        pytest.param(
            [chunk(0, 5, 3, b"a")], "every piece carries at least one byte", id="count-over-total"
        ),
        pytest.param([chunk(0, 2, 4, b"ab", kind="forward")], "also sets kind", id="extra-field"),
        pytest.param(
            [chunk(0, 2, 100, NOT_AN_ENVELOPE[:50]), chunk(1, 2, 100, NOT_AN_ENVELOPE[50:])],
            "not a protobuf",
            id="garbage",
        ),
        pytest.param(
            [chunk(0, 2, len(NESTED), NESTED[:5]), chunk(1, 2, len(NESTED), NESTED[5:])],
            "chunks do not nest",
            id="nested",
        ),
    ],
)
def test_broken_chunk_sequences_are_invalid_argument(
    server: RunningServer, sequence: list[split_pb2.Envelope | bytes], words: str
) -> None:
    with grpc.insecure_channel(server.address) as channel:
        bad = RawStream(server, channel)
        bad.send(*sequence)
        error = bad.end()
        bad.close()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert words in error.details(), error.details()
    # the server goes on serving (a chunked request included)
    with connect(server) as t:
        assert t.request(Message(Kind.FORWARD, "s", "", 1, {"act": bytes(2 * LIMIT)})).meta["got"]


def test_a_declared_total_over_the_bound_is_refused_at_chunk_0(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        bad = RawStream(server, channel)
        bad.send(chunk(0, 100_000, 1 << 30, b"x"))
        error = bad.end()
        bad.close()
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "declares 1073741824 bytes, over the limit of 1048576" in error.details()


def test_half_sent_chunks_of_all_streams_are_bounded_and_released() -> None:
    limits = SessionLimits(max_assembly_bytes=3 * LIMIT)
    srv = serve_handler(
        echo_big, "127.0.0.1", 0, tokens=TOKENS, max_message_bytes=LIMIT, limits=limits
    )
    piece = bytes(LIMIT - CHUNK_OVERHEAD)
    try:
        with grpc.insecure_channel(srv.address) as channel:
            # three streams hold 1, 1 and 2 pieces: 4 pieces, over the budget of 3 * LIMIT.
            # Whichever the server reads last crosses the line and is told to retry later.
            streams = [RawStream(srv, channel) for _ in range(3)]
            ended: queue.Queue[grpc.RpcError] = queue.Queue()
            for n, stream in zip((1, 1, 2), streams, strict=True):
                stream.send(*[chunk(i, 8, 8 * len(piece), piece) for i in range(n)])
                threading.Thread(target=lambda s=stream: ended.put(s.end()), daemon=True).start()
            error = ended.get(timeout=60)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "Concurrent RPC limit exceeded" in error.details()
            assert "max_assembly_bytes=" in error.details()
            for stream in streams:  # ending the streams releases what they held
                stream.close()
            # so a chunked request now fits (the client retries the limit text with backoff)
            retry = RetryPolicy(attempts=20, initial_backoff=0.05, max_backoff=0.2)
            with GrpcTransport(
                srv.address, TOKENS["alice"], max_message_bytes=LIMIT, retry=retry, timeout=30
            ) as t:
                message = Message(Kind.FORWARD, "s", "", 1, {"act": bytes(2 * LIMIT)})
                assert t.request(message).meta["got"]["act"][0] == 2 * LIMIT
    finally:
        srv.stop(None)


def test_assembler_errors_are_typed() -> None:
    joiner = ChunkAssembler(100, "reply")
    with pytest.raises(EnvelopeTooLarge, match="chunked reply declares 101 bytes"):
        joiner.feed(chunk(0, 2, 101, b"x"))
    assert issubclass(EnvelopeTooLarge, ChunkError) and issubclass(ChunkError, ProtocolError)
    joiner.reset()
    with pytest.raises(ChunkError, match="reply chunk 3 arrived"):
        joiner.feed(chunk(3, 4, 10, b"x"))


def test_one_token_cannot_take_the_whole_chunk_budget() -> None:
    limits = SessionLimits(max_assembly_bytes_per_client=3 * LIMIT)
    assert SessionLimits().client_assembly_bytes == EnvelopeLimits().max_envelope_bytes
    with pytest.raises(ConfigError, match="max_assembly_bytes_per_client must be positive"):
        SessionLimits(max_assembly_bytes_per_client=0)
    srv = serve_handler(
        echo_big, "127.0.0.1", 0, tokens=TOKENS, max_message_bytes=LIMIT, limits=limits
    )
    piece = bytes(LIMIT - CHUNK_OVERHEAD)
    total = 8 * len(piece)
    try:
        with grpc.insecure_channel(srv.address) as channel:
            # mallory holds 2 pieces on each of two streams: over its 3 * LIMIT. Which stream
            # crosses the line depends on the order the server reads them; that one is refused.
            streams = [RawStream(srv, channel) for _ in range(2)]
            ended: queue.Queue[grpc.RpcError] = queue.Queue()
            for stream in streams:
                stream.send(chunk(0, 8, total, piece), chunk(1, 8, total, piece))
                threading.Thread(target=lambda s=stream: ended.put(s.end()), daemon=True).start()
            error = ended.get(timeout=60)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "client 'mallory' holds" in error.details()
            assert "max_assembly_bytes_per_client" in error.details()
            # another token is not affected: its chunked request goes through meanwhile
            with connect(srv) as t:
                message = Message(Kind.FORWARD, "s", "", 1, {"act": bytes(2 * LIMIT)})
                assert t.request(message).meta["got"]["act"][0] == 2 * LIMIT
            for stream in streams:
                stream.close()
    finally:
        srv.stop(None)


def test_a_request_refused_for_its_size_does_not_fix_the_streams_ids() -> None:
    def session_of(message: Message) -> Message:
        return Message(
            Kind.ACK,
            message.session,
            message.client,
            message.step,
            {},
            {"session": message.session},
        )

    srv = serve_handler(session_of, "127.0.0.1", 0, tokens=TOKENS)
    try:
        with GrpcTransport(
            srv.address, TOKENS["alice"], max_envelope_bytes=1000, retry=NO_RETRY
        ) as t:
            with pytest.raises(TransportError, match="max_envelope_bytes"):
                t.request(Message(Kind.FORWARD, "a", "", 1, {"act": bytes(2000)}))
            # the stream's first request actually sent names its session in full
            assert t.request(Message(Kind.FORWARD, "a", "", 2)).meta["session"] == "a"
            assert t.request(Message(Kind.FORWARD, "a", "", 3)).meta["session"] == "a"
    finally:
        srv.stop(None)
