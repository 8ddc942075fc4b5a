"""The gRPC transport against a real server on 127.0.0.1 in this process.

Tensors are plain bytes to the transport, so the toy handlers use raw float32 buffers instead of
codec frames; what matters here is that bytes, order, identity and errors survive the network.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from edgesplit.errors import ProtocolError, TransportError
from edgesplit.transport.grpc_client import GrpcTransport, RetryPolicy, fetch_status
from edgesplit.transport.grpc_server import RunningServer, SessionLimits, serve_handler
from edgesplit.transport.tokens import Role, TokenGrant
from edgesplit.wire.messages import Kind, Message, error_message

TOKENS = {"alice": "tok-alice-0123456789", "bob": "tok-bob-0123456789ab"}
# What the server holds: 'bob' also reads Status (role=admin), the others only train.
SERVED = {**TOKENS, "bob": TokenGrant(TOKENS["bob"], frozenset({Role.TRAIN, Role.ADMIN}))}
FAST_RETRY = RetryPolicy(attempts=8, initial_backoff=0.05, max_backoff=0.4, jitter=0.1)


def raw(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x, dtype=np.float32).tobytes()


def sum_handler(message: Message) -> Message:
    """FORWARD{a, b} -> GRADIENT{sum}; the reply names who the server thinks is speaking."""
    if message.kind == "boom":
        raise RuntimeError("handler bug")
    a, b = message.frame("a"), message.frame("b")
    if len(a) != len(b) or len(a) % 4:
        return error_message(message, "INVALID_ARGUMENT", f"frames a ({len(a)} B) and b "
                             f"({len(b)} B) are not float32 vectors of one length")
    total = np.frombuffer(a, np.float32) + np.frombuffer(b, np.float32)
    return Message(
        Kind.GRADIENT, message.session, message.client, message.step,
        {"sum": total.tobytes()}, {"seen_client": message.client, "order": list(message.tensors)},
    )


@pytest.fixture
def server() -> Iterator[RunningServer]:
    srv = serve_handler(
        sum_handler, "127.0.0.1", 0, tokens=SERVED,
        status=lambda: {"clients": sorted(TOKENS), "steps": 3},
    )
    yield srv
    srv.stop(None)


def connect(srv: RunningServer, token: str | None = TOKENS["alice"], **kw) -> GrpcTransport:
    kw.setdefault("retry", FAST_RETRY)
    kw.setdefault("timeout", 10.0)
    return GrpcTransport(f"127.0.0.1:{srv.port}", token, **kw)


def forward(step: int, a: np.ndarray, b: np.ndarray, session: str = "s1") -> Message:
    return Message(Kind.FORWARD, session, "", step, {"a": raw(a), "b": raw(b)}, {"train": True})


def test_round_trip_bytes_order_and_counters(server: RunningServer) -> None:
    with connect(server) as t:
        for step in range(1, 4):
            a = np.arange(5, dtype=np.float32) * step
            reply = t.request(forward(step, a, np.ones(5)))
            assert reply.kind == Kind.GRADIENT and reply.step == step and reply.session == "s1"
            np.testing.assert_array_equal(np.frombuffer(reply.frame("sum"), np.float32), a + 1)
            assert reply.meta["order"] == ["a", "b"]  # tensor order survives the wire
        assert t.messages == 3
        assert t.bytes_up == 3 * 40 and t.bytes_down == 3 * 20
        # envelopes carry kind/session/meta besides the frames
        assert t.wire_bytes_up > t.bytes_up and t.wire_bytes_down > t.bytes_down
        assert t.reconnects == 0 and t.resends == 0


def test_concurrent_clients_on_threads(server: RunningServer) -> None:
    errors: list[BaseException] = []

    def run(name: str, offset: float) -> None:
        try:
            with connect(server, TOKENS[name]) as t:
                for step in range(20):
                    a = np.full(64, offset + step, np.float32)
                    reply = t.request(forward(step, a, a, session=f"sess-{name}-{offset}"))
                    got = np.frombuffer(reply.frame("sum"), np.float32)
                    if not np.array_equal(got, 2 * a) or reply.meta["seen_client"] != name:
                        raise AssertionError(f"{name}: wrong reply at step {step}")
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(name, float(i)))
        for i, name in enumerate(["alice", "bob", "alice", "bob", "alice", "bob"])
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not errors, errors


@pytest.mark.parametrize("token", ["not-a-known-token", None])
def test_wrong_or_missing_token_is_unauthenticated(server: RunningServer, token) -> None:
    with connect(server, token) as t, pytest.raises(TransportError) as info:
        t.request(forward(1, np.ones(2), np.ones(2)))
    text = str(info.value)
    assert "unauthenticated" in text.lower() and "--token" in text
    assert t.reconnects == 0  # refused tokens are not retried


def test_client_name_is_the_tokens_name(server: RunningServer) -> None:
    with connect(server, TOKENS["bob"]) as t:
        msg = forward(1, np.ones(2), np.ones(2))
        msg.client = "alice"  # bob pretends to be alice
        reply = t.request(msg)
    assert reply.meta["seen_client"] == "bob"
    assert reply.client == "bob"


def test_invalid_argument_ends_only_that_stream(server: RunningServer) -> None:
    with connect(server) as bad, connect(server, TOKENS["bob"]) as good:
        assert good.request(forward(1, np.ones(3), np.ones(3))).kind == Kind.GRADIENT
        broken = Message(Kind.FORWARD, "s1", "", 1, {"a": b"\x00" * 7, "b": b"\x00" * 8})
        with pytest.raises(ProtocolError, match="not float32 vectors"):
            bad.request(broken)
        assert bad.reconnects == 0  # INVALID_ARGUMENT is not retried
        # the other client's open stream is untouched ...
        assert good.request(forward(2, np.ones(3), np.ones(3))).kind == Kind.GRADIENT
        # ... and the refused client can go on with a new stream
        assert bad.request(forward(2, np.ones(3), np.ones(3))).kind == Kind.GRADIENT


def test_handler_exception_is_internal_for_that_stream_only(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    with connect(server) as t, connect(server, TOKENS["bob"]) as other:
        assert other.request(forward(1, np.ones(2), np.ones(2))).step == 1
        with caplog.at_level(logging.ERROR), pytest.raises(TransportError, match="INTERNAL"):
            t.request(Message("boom", "s1", "", 1))
        assert "handler failed on boom" in caplog.text
        assert other.request(forward(2, np.ones(2), np.ones(2))).step == 2
        assert t.request(forward(2, np.ones(2), np.ones(2))).step == 2


def test_server_restart_resends_unanswered_step(caplog: pytest.LogCaptureFixture) -> None:
    entered, release = threading.Event(), threading.Event()
    first_seen: list[tuple[str, int]] = []
    second_seen: list[tuple[str, str, int]] = []

    def first(message: Message) -> Message:
        first_seen.append((message.session, message.step))
        if message.step == 2:  # the server "dies" while working on step 2
            entered.set()
            release.wait(10)
        return sum_handler(message)

    def second(message: Message) -> Message:
        second_seen.append((message.session, message.client, message.step))
        return sum_handler(message)

    srv1 = serve_handler(first, "127.0.0.1", 0, tokens=SERVED)
    port = srv1.port
    srv2: RunningServer | None = None
    result: dict[str, object] = {}
    try:
        t = connect(srv1)
        assert t.request(forward(1, np.ones(2), np.ones(2))).step == 1

        def step2() -> None:
            try:
                result["reply"] = t.request(forward(2, np.full(2, 3.0), np.ones(2)))
            except BaseException as exc:
                result["error"] = exc

        caller = threading.Thread(target=step2)
        with caplog.at_level(logging.WARNING, logger="edgesplit.transport.grpc_client"):
            caller.start()
            assert entered.wait(5)
            srv1.stop(None)
            time.sleep(0.3)  # down for a while: the client must back off and try again
            srv2 = serve_handler(second, "127.0.0.1", port, tokens=SERVED)
            caller.join(15)
        assert "error" not in result, result.get("error")
        reply = result["reply"]
        assert isinstance(reply, Message) and reply.step == 2
        np.testing.assert_array_equal(np.frombuffer(reply.frame("sum"), np.float32), [4, 4])
        # same session, same step, same (token-derived) client on the new server
        assert second_seen[0] == ("s1", "alice", 2)
        assert first_seen == [("s1", 1), ("s1", 2)]
        assert "retrying in" in caplog.text
        assert t.reconnects >= 1 and t.resends >= 1
        # the session goes on over the new connection
        assert t.request(forward(3, np.ones(2), np.ones(2))).step == 3
        t.close()
    finally:
        release.set()
        srv1.stop(None)
        if srv2 is not None:
            srv2.stop(None)


def test_a_server_never_reached_fails_at_once_in_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # nothing listens on the port: retrying for a minute would only hide that (the retries are
    # for a server that answered before and went away, see the restart test above)
    srv = serve_handler(sum_handler, "127.0.0.1", 0, tokens=SERVED)
    port = srv.port
    srv.stop(None)
    policy = RetryPolicy(attempts=5, initial_backoff=0.5, max_backoff=1.0)
    t = GrpcTransport(f"127.0.0.1:{port}", TOKENS["alice"], retry=policy)
    with caplog.at_level(logging.INFO), pytest.raises(
        TransportError, match=rf"cannot reach 127\.0\.0\.1:{port} \(connection refused\).*serve"
    ):
        t.request(forward(1, np.ones(2), np.ones(2)))
    assert not [r for r in caplog.records if "still down" in r.getMessage()]
    t.close()


def test_retry_budget_adds_the_capped_backoffs() -> None:
    assert RetryPolicy().budget == pytest.approx(0.5 + 1 + 2 + 4 + 8 + 15 + 15 + 15)
    assert RetryPolicy(attempts=0).budget == 0


def test_message_over_client_limit_fails_before_sending(server: RunningServer) -> None:
    # over max_message_bytes a request goes as chunks; over max_envelope_bytes it is refused
    with connect(server, max_envelope_bytes=1024) as t:
        with pytest.raises(TransportError, match="1024 bytes.*max_envelope_bytes"):
            t.request(forward(1, np.ones(400), np.ones(400)))
        # nothing was sent, the stream is fine
        assert t.request(forward(2, np.ones(4), np.ones(4))).step == 2
        assert t.wire_bytes_up < 1024


def test_message_over_server_limit_is_resource_exhausted() -> None:
    srv = serve_handler(sum_handler, "127.0.0.1", 0, tokens=SERVED, max_message_bytes=4096)
    try:
        with connect(srv) as t:
            with pytest.raises(TransportError, match="RESOURCE_EXHAUSTED") as info:
                t.request(forward(1, np.ones(2000), np.ones(2000)))
            assert "max_message_bytes" in str(info.value)
            assert t.reconnects == 0
            assert t.request(forward(2, np.ones(4), np.ones(4))).step == 2
    finally:
        srv.stop(None)


def test_reply_over_client_limit_is_resource_exhausted() -> None:
    def big(message: Message) -> Message:
        return Message(Kind.GRADIENT, message.session, message.client, message.step,
                       {"grad": bytes(100_000)})

    srv = serve_handler(big, "127.0.0.1", 0, tokens=SERVED)
    try:
        with connect(srv, max_message_bytes=8192) as t, pytest.raises(TransportError) as info:
            t.request(Message(Kind.FORWARD, "s", "", 1, {"a": b"x"}))
        assert "8192" in str(info.value) and "RESOURCE_EXHAUSTED" in str(info.value)
    finally:
        srv.stop(None)


def test_reply_timeout() -> None:
    release = threading.Event()

    def slow(message: Message) -> Message:
        release.wait(5)
        return sum_handler(message)

    srv = serve_handler(slow, "127.0.0.1", 0, tokens=SERVED)
    try:
        with connect(srv, timeout=0.3) as t, pytest.raises(TransportError, match="timeout"):
            t.request(forward(1, np.ones(2), np.ones(2)))
    finally:
        release.set()
        srv.stop(None)


def test_reply_for_another_step_is_a_protocol_error() -> None:
    def wrong_step(message: Message) -> Message:
        return Message(Kind.ACK, message.session, message.client, message.step + 1)

    srv = serve_handler(wrong_step, "127.0.0.1", 0, tokens=SERVED)
    try:
        with connect(srv) as t, pytest.raises(ProtocolError, match="does not answer"):
            t.request(Message(Kind.HELLO, "s", "", 0))
    finally:
        srv.stop(None)


def test_status_rpc(server: RunningServer) -> None:
    target = f"127.0.0.1:{server.port}"
    assert fetch_status(target, TOKENS["bob"]) == {"clients": ["alice", "bob"], "steps": 3}
    with pytest.raises(TransportError, match="unauthenticated"):
        fetch_status(target, "wrong-token-wrong-token")


def test_status_without_callback_and_without_tokens() -> None:
    srv = serve_handler(sum_handler, "127.0.0.1", 0)
    try:
        assert fetch_status(f"127.0.0.1:{srv.port}", None) == {}
        # no tokens: the message's own client name is kept
        with GrpcTransport(f"127.0.0.1:{srv.port}", None, retry=FAST_RETRY) as t:
            msg = forward(1, np.ones(2), np.ones(2))
            msg.client = "anon"
            assert t.request(msg).meta["seen_client"] == "anon"
    finally:
        srv.stop(None)


def test_closed_transport_refuses(server: RunningServer) -> None:
    t = connect(server)
    t.request(forward(1, np.ones(2), np.ones(2)))
    t.close()
    t.close()  # idempotent
    with pytest.raises(TransportError, match="closed"):
        t.request(forward(2, np.ones(2), np.ones(2)))


def test_full_server_is_retried_until_a_slot_frees(caplog: pytest.LogCaptureFixture) -> None:
    srv = serve_handler(sum_handler, "127.0.0.1", 0, tokens=SERVED,
                        limits=SessionLimits(max_sessions=1))
    try:
        first = connect(srv)
        first.request(forward(1, np.ones(2), np.ones(2)))  # holds the only session slot
        second = connect(srv, TOKENS["bob"])
        closer = threading.Timer(0.3, first.close)
        closer.start()
        with caplog.at_level(logging.WARNING, logger="edgesplit.transport.grpc_client"):
            assert second.request(forward(1, np.ones(2), np.ones(2))).step == 1
        assert "limit of concurrent sessions" in caplog.text
        closer.join()
        second.close()
    finally:
        srv.stop(None)


def test_malformed_envelope_from_a_raw_client_is_invalid_argument(server: RunningServer) -> None:
    import grpc

    from edgesplit.transport import split_pb2, split_pb2_grpc

    bad = split_pb2.Envelope(kind="forward", session="s", step=1, tensors=[
        split_pb2.Tensor(name="a", frame=b"1"), split_pb2.Tensor(name="a", frame=b"2")])
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = split_pb2_grpc.SplitStub(channel).Session(
            iter([bad]), metadata=[("authorization", f"Bearer {TOKENS['alice']}")])
        with pytest.raises(grpc.RpcError) as info:
            list(call)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensor 'a' twice" in info.value.details()
