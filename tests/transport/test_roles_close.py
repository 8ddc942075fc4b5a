"""What a token's stream leaves behind when it ends (issue 9, defect 2, transport side): the
servicer tells its owner ``on_stream_closed(client, session)`` however the stream ended (end of
stream, abort, idle timeout, cancellation), so the engine can release what it holds for that
session. A real gRPC server; only the handler is a small Python object that records calls."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from edgesplit.cli.serve import stream_closed_hook
from edgesplit.errors import ProtocolError, TransportError
from edgesplit.transport import split_pb2
from edgesplit.transport.grpc_client import GrpcTransport, RetryPolicy
from edgesplit.transport.grpc_server import RunningServer, SessionLimits, serve_handler
from edgesplit.transport.tokens import Role, TokenGrant
from edgesplit.wire.messages import Kind, Message, error_message

TOKENS = {
    "alice": TokenGrant("tok-alice-0123456789abcd"),
    "kiosk": TokenGrant("tok-kiosk-0123456789abcd", frozenset({Role.INFER})),
}
NO_RETRY = RetryPolicy(attempts=0)


class Engine:
    """Stands in for SplitServer: answers ACK (ERROR INVALID_ARGUMENT for kind 'bad') and
    records every close_session call."""

    def __init__(self) -> None:
        self.closed: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def handle(self, message: Message) -> Message:
        if message.kind == "bad":
            return error_message(message, "INVALID_ARGUMENT", "bad request")
        return Message(Kind.ACK, message.session, message.client, message.step)

    def close_session(self, client: str, session: str) -> None:
        with self._lock:
            self.closed.append((client, session))

    def calls(self) -> list[tuple[str, str]]:
        with self._lock:
            return sorted(self.closed)


def wait_until(condition: Callable[[], bool], limit: float = 10.0) -> bool:
    """Poll ``condition`` until true or ``limit`` seconds pass (the hook runs on a thread)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture
def engine() -> Engine:
    return Engine()


def start(engine: Engine, limits: SessionLimits | None = None) -> RunningServer:
    return serve_handler(
        engine.handle,
        "127.0.0.1",
        0,
        tokens=TOKENS,
        limits=limits,
        on_stream_closed=stream_closed_hook(engine),
    )


@pytest.fixture
def server(engine: Engine) -> Iterator[RunningServer]:
    srv = start(engine)
    yield srv
    srv.stop(None)


def connect(srv: RunningServer, name: str = "alice") -> GrpcTransport:
    return GrpcTransport(srv.address, TOKENS[name].token, retry=NO_RETRY, timeout=10)


def test_end_of_stream_releases_the_session(engine: Engine, server: RunningServer) -> None:
    with connect(server) as t:
        t.request(Message(Kind.HELLO, "s1", "", 0))
        t.request(Message(Kind.FORWARD, "s1", "", 1))
        assert engine.calls() == []  # not while the stream is open
    assert wait_until(lambda: engine.calls() == [("alice", "s1")]), engine.calls()


def test_every_session_a_stream_carried_is_released(engine: Engine, server: RunningServer) -> None:
    with connect(server) as t:
        t.request(Message(Kind.HELLO, "s1", "", 0))
        t.request(Message(Kind.HELLO, "s2", "", 1))
        t.request(Message(Kind.FORWARD, "s1", "", 2))
    assert wait_until(lambda: engine.calls() == [("alice", "s1"), ("alice", "s2")])
    time.sleep(0.2)
    assert engine.calls() == [("alice", "s1"), ("alice", "s2")]  # once each


def test_a_stream_the_server_aborts_releases_its_session(
    engine: Engine, server: RunningServer
) -> None:
    with connect(server) as t:
        t.request(Message(Kind.HELLO, "s1", "", 0))
        with pytest.raises(ProtocolError, match="bad request"):
            t.request(Message("bad", "s1", "", 1))
        assert wait_until(lambda: engine.calls() == [("alice", "s1")]), engine.calls()


def test_a_refused_request_creates_nothing_to_release(
    engine: Engine, server: RunningServer
) -> None:
    with connect(server, "kiosk") as t, pytest.raises(TransportError, match="PERMISSION_DENIED"):
        t.request(Message(Kind.FORWARD, "k1", "", 1))
    with connect(server, "kiosk") as t:
        t.request(Message(Kind.PREDICT, "k2", "", 1))
        with pytest.raises(TransportError, match="PERMISSION_DENIED"):
            t.request(Message(Kind.FORWARD, "k3", "", 2))
    # k2 reached the handler and is released; k1 and k3 never did
    assert wait_until(lambda: engine.calls() == [("kiosk", "k2")]), engine.calls()
    time.sleep(0.2)
    assert engine.calls() == [("kiosk", "k2")]


def test_idle_timeout_releases_the_session(engine: Engine) -> None:
    srv = start(engine, limits=SessionLimits(idle_timeout=0.3))
    try:
        t = connect(srv)
        t.request(Message(Kind.HELLO, "idle", "", 0))
        assert wait_until(lambda: engine.calls() == [("alice", "idle")]), engine.calls()
        t.close()
    finally:
        srv.stop(None)


def test_a_cancelled_stream_releases_its_session(engine: Engine, server: RunningServer) -> None:
    requests: queue.Queue[bytes | None] = queue.Queue()
    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_stream(
            "/edgesplit.v1.Split/Session",
            request_serializer=None,
            response_deserializer=split_pb2.Envelope.FromString,
        )(
            iter(requests.get, None),
            metadata=[("authorization", f"Bearer {TOKENS['alice'].token}")],
        )
        requests.put(split_pb2.Envelope(kind="hello", session="c1", step=0).SerializeToString())
        assert next(call).step == 0
        call.cancel()  # a client that vanishes without half-closing
        requests.put(None)
        assert wait_until(lambda: engine.calls() == [("alice", "c1")]), engine.calls()


def test_a_failing_hook_is_logged_and_the_server_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(client: str | None, session: str | None) -> None:
        raise RuntimeError("release failed")

    engine = Engine()
    srv = serve_handler(engine.handle, "127.0.0.1", 0, tokens=TOKENS, on_stream_closed=broken)
    try:
        with caplog.at_level(logging.ERROR, logger="edgesplit.transport.grpc_server"):
            with connect(srv) as t:
                t.request(Message(Kind.HELLO, "s1", "", 0))
            assert wait_until(
                lambda: "releasing session 's1' of client 'alice' failed" in caplog.text
            )
        with connect(srv) as t:
            assert t.request(Message(Kind.HELLO, "s2", "", 0)).kind == Kind.ACK
    finally:
        srv.stop(None)


def test_serve_wires_close_session_only_when_the_engine_has_it() -> None:
    assert stream_closed_hook(object()) is None
    engine = Engine()
    hook = stream_closed_hook(engine)
    assert hook is not None
    hook(None, "s")  # no tokens, unnamed client: the engine's "" client
    hook("bob", None)  # a stream that named no session: nothing to release
    hook("bob", "t")
    assert engine.calls() == [("", "s"), ("bob", "t")]
