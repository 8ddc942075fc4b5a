"""What one client (holding a valid token) can do to everyone else: session caps, idle timeouts,
a Status that never starves, a port that is never shared, and a strict envelope parser."""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from edgesplit.errors import ConfigError, ProtocolError, TransportError
from edgesplit.transport import split_pb2
from edgesplit.transport.envelope import EnvelopeLimits
from edgesplit.transport.grpc_client import GrpcTransport, RetryPolicy, fetch_status
from edgesplit.transport.grpc_server import RunningServer, SessionLimits, serve_handler
from edgesplit.transport.tokens import Role, TokenGrant
from edgesplit.wire.messages import Kind, Message

TOKENS = {"mallory": "tok-mallory-0123456789", "alice": "tok-alice-0123456789ab"}
# What the server holds: 'alice' also reads Status (role=admin), the others only train.
SERVED = {**TOKENS, "alice": TokenGrant(TOKENS["alice"], frozenset({Role.TRAIN, Role.ADMIN}))}
SESSION = "/edgesplit.v1.Split/Session"


def echo(message: Message) -> Message:
    return Message(Kind.ACK, message.session, message.client, message.step, {}, {"ok": True})


class RawStream:
    """A Session stream we drive by hand: raw request bytes in, replies or the status out."""

    def __init__(self, channel: grpc.Channel, token: str) -> None:
        self._requests: queue.Queue[bytes | None] = queue.Queue()
        call = channel.stream_stream(
            SESSION, request_serializer=None, response_deserializer=split_pb2.Envelope.FromString
        )
        self.call = call(self._iter(), metadata=[("authorization", f"Bearer {token}")])

    def _iter(self) -> Iterator[bytes]:
        while (item := self._requests.get()) is not None:
            yield item

    def send(self, data: bytes) -> None:
        self._requests.put(data)

    def end(self) -> grpc.RpcError:
        """Wait for the stream's end (bounded) and return its error status."""
        try:
            for _ in self.call:
                pass
        except grpc.RpcError as exc:
            return exc
        raise AssertionError("stream ended without an error status")

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()


def envelope(step: int = 1, meta_json: str = "", n_tensors: int = 0) -> bytes:
    tensors = [split_pb2.Tensor(name=f"t{i}", frame=b"x") for i in range(n_tensors)]
    return split_pb2.Envelope(kind="forward", session="s", step=step, tensors=tensors,
                              meta_json=meta_json).SerializeToString()


@pytest.fixture
def server() -> Iterator[RunningServer]:
    srv = serve_handler(echo, "127.0.0.1", 0, tokens=SERVED, max_workers=2,
                        status=lambda: {"alive": True},
                        limits=SessionLimits(max_streams_per_client=3, idle_timeout=30))
    yield srv
    srv.stop(None)


def test_idle_streams_of_one_client_lock_nobody_out(server: RunningServer) -> None:
    target = f"127.0.0.1:{server.port}"
    held: list[RawStream] = []
    with grpc.insecure_channel(target) as channel:
        try:
            # More idle streams than compute threads (2) and than the per-client cap (3).
            for step in range(3):
                stream = RawStream(channel, TOKENS["mallory"])
                stream.send(envelope(step + 1))
                assert next(stream.call).step == step + 1  # open, answered, now idle
                held.append(stream)
            extra = RawStream(channel, TOKENS["mallory"])
            error = extra.end()
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "'mallory' already has 3 open sessions" in error.details()
            assert "max_streams_per_client=3" in error.details()
            # Everyone else goes on: a session and Status both answer at once.
            t0 = time.monotonic()
            with GrpcTransport(target, TOKENS["alice"], timeout=5) as alice:
                for step in (1, 2, 3):
                    assert alice.request(Message(Kind.FORWARD, "a", "", step)).step == step
            assert fetch_status(target, TOKENS["alice"]) == {"alive": True}
            with pytest.raises(TransportError, match="PERMISSION_DENIED.*role train"):
                fetch_status(target, TOKENS["mallory"])  # a training token does not read it
            assert time.monotonic() - t0 < 5
            # The cap is on open streams: closing one lets mallory open another.
            held.pop().close()
            again = GrpcTransport(target, TOKENS["mallory"], timeout=5,
                                  retry=RetryPolicy(attempts=5, initial_backoff=0.1))
            assert again.request(Message(Kind.FORWARD, "m", "", 9)).step == 9
            again.close()
        finally:
            for stream in held:
                stream.close()


def test_over_the_cap_client_gets_a_clear_error_after_its_retries() -> None:
    srv = serve_handler(echo, "127.0.0.1", 0, tokens=SERVED,
                        limits=SessionLimits(max_streams_per_client=1))
    try:
        target = f"127.0.0.1:{srv.port}"
        with GrpcTransport(target, TOKENS["mallory"]) as first:
            first.request(Message(Kind.FORWARD, "a", "", 1))
            policy = RetryPolicy(attempts=1, initial_backoff=0.01, max_backoff=0.01)
            with GrpcTransport(target, TOKENS["mallory"], retry=policy) as second, \
                    pytest.raises(TransportError, match="limit of concurrent sessions"):
                second.request(Message(Kind.FORWARD, "b", "", 1))
    finally:
        srv.stop(None)


def test_idle_stream_is_closed_and_a_real_client_carries_on() -> None:
    srv = serve_handler(echo, "127.0.0.1", 0, tokens=SERVED,
                        limits=SessionLimits(idle_timeout=0.3))
    try:
        target = f"127.0.0.1:{srv.port}"
        with grpc.insecure_channel(target) as channel:
            silent = RawStream(channel, TOKENS["mallory"])
            t0 = time.monotonic()
            error = silent.end()
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "idle for more than 0.3 s" in error.details()
            assert time.monotonic() - t0 < 5
            silent.close()
        with GrpcTransport(target, TOKENS["alice"], timeout=5) as alice:
            assert alice.request(Message(Kind.FORWARD, "a", "", 1)).step == 1
            time.sleep(0.8)  # the server closes the idle stream meanwhile
            assert alice.request(Message(Kind.FORWARD, "a", "", 2)).step == 2
            assert alice.resends == 0  # a fresh stream, not a retry of a lost request
    finally:
        srv.stop(None)


def test_second_server_on_a_busy_port_is_refused(server: RunningServer) -> None:
    with pytest.raises(TransportError, match=f"cannot listen on 127.0.0.1:{server.port}: the "
                       "port is in use"):
        serve_handler(echo, "127.0.0.1", server.port, tokens=SERVED)
    # The first one still answers alone.
    with GrpcTransport(f"127.0.0.1:{server.port}", TOKENS["alice"], timeout=5) as t:
        assert t.request(Message(Kind.FORWARD, "a", "", 1)).step == 1


def test_port_held_by_another_program_is_refused() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(TransportError, match="in use"):
            serve_handler(echo, "127.0.0.1", port, tokens=SERVED)


BAD_REQUESTS = {
    "not protobuf": (b"\xff\xff\xff\xff", "not a protobuf edgesplit.v1.Envelope"),
    "invalid utf-8 kind": (b"\x0a\x02\xc3\x28", "not a protobuf edgesplit.v1.Envelope"),
    "Infinity": (envelope(meta_json='{"lr": Infinity}'), "contains Infinity"),
    "NaN": (envelope(meta_json='{"lr": NaN}'), "contains NaN"),
    "1e400": (envelope(meta_json='{"lr": 1e400}'), "overflows a 64-bit float"),
    "huge int": (envelope(meta_json='{"n": ' + "9" * 400 + "}"), "must fit in 64 bits"),
    "deep nesting": (envelope(meta_json='{"a":' * 2000 + "1" + "}" * 2000),
                     "nested 2000 levels deep; the server accepts at most 32"),
    "meta not object": (envelope(meta_json="[1]"), "must be a JSON object"),
    "meta too big": (envelope(meta_json=json.dumps({"pad": "x" * 70_000})),
                     "the server accepts at most 65536"),
    "too many tensors": (envelope(n_tensors=65), "65 tensors; the server accepts at most 64"),
    "long session": (split_pb2.Envelope(kind="forward", session="s" * 300, step=1)
                     .SerializeToString(), "session is 300 characters"),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_envelopes_are_invalid_argument(server: RunningServer, name: str) -> None:
    data, expected = BAD_REQUESTS[name]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stream = RawStream(channel, TOKENS["alice"])
        stream.send(data)
        error = stream.end()
        stream.close()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert expected in error.details()


def test_limits_that_pass_and_the_ones_that_are_configurable() -> None:
    srv = serve_handler(echo, "127.0.0.1", 0, tokens=SERVED,
                        limits=SessionLimits(envelope=EnvelopeLimits(max_meta_bytes=100)))
    try:
        with GrpcTransport(f"127.0.0.1:{srv.port}", TOKENS["alice"], timeout=5) as t:
            ok = Message(Kind.FORWARD, "a", "", 1, {}, {"lr": 1e300, "n": 2**63})
            assert t.request(ok).meta == {"ok": True}
            with pytest.raises(ProtocolError, match="INVALID_ARGUMENT.*at most 100"):
                t.request(Message(Kind.FORWARD, "a", "", 2, {}, {"pad": "x" * 200}))
    finally:
        srv.stop(None)


def test_status_is_answered_while_every_compute_thread_is_busy() -> None:
    release = threading.Event()

    def slow(message: Message) -> Message:
        release.wait(10)
        return echo(message)

    srv = serve_handler(slow, "127.0.0.1", 0, tokens=SERVED, max_workers=1,
                        status=lambda: {"alive": True})
    target = f"127.0.0.1:{srv.port}"
    clients = [GrpcTransport(target, TOKENS[n], timeout=15) for n in ("alice", "mallory")]
    threads = [threading.Thread(target=c.request, args=(Message(Kind.FORWARD, "x", "", 1),))
               for c in clients]
    try:
        for t in threads:
            t.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        assert fetch_status(target, TOKENS["alice"]) == {"alive": True}
        assert time.monotonic() - t0 < 2
    finally:
        release.set()
        for t in threads:
            t.join(10)
        for c in clients:
            c.close()
        srv.stop(None)


def test_session_limits_are_checked() -> None:
    with pytest.raises(ConfigError, match="idle_timeout must be positive"):
        SessionLimits(idle_timeout=0)
    with pytest.raises(ConfigError, match="must be positive"):
        SessionLimits(max_streams_per_client=0)
    with pytest.raises(ConfigError, match="max_meta_bytes must be positive"):
        EnvelopeLimits(max_meta_bytes=0)
    assert np.isfinite(SessionLimits().idle_timeout)
