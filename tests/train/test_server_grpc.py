"""The server core behind a real gRPC server (issue 9): interleaved ushape sessions over two
streams, what a closed stream leaves behind measured by the server's own accounting, and HELLO
refusals that reach the client as replies."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

from edgesplit.cli.serve import stream_closed_hook
from edgesplit.train.server import SplitServer
from edgesplit.train.server_records import SESSION_OVERHEAD
from edgesplit.transport.grpc_client import GrpcTransport, RetryPolicy
from edgesplit.transport.grpc_server import RunningServer, serve_handler
from edgesplit.transport.tokens import TokenGrant
from edgesplit.wire.frame import encode_frame
from edgesplit.wire.messages import Kind, Message

TOKENS = {
    "alice": TokenGrant("tok-alice-0123456789abcd"),
    "bob": TokenGrant("tok-bob-0123456789abcdef"),
}


def _frame(seed: int, shape: tuple[int, ...]) -> bytes:
    return encode_frame(np.random.default_rng(seed).normal(size=shape).astype(np.float32), "fp32")


def _wait_until(condition: Callable[[], bool], limit: float = 20.0) -> bool:
    """Poll ``condition`` (the close hook runs on a server thread); no timing is asserted."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture
def ushape() -> Iterator[tuple[SplitServer, RunningServer]]:
    torch.manual_seed(0)
    server = SplitServer(
        "ushape",
        torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh()),
        require_hello=True,
        wait_timeout=20,
    )
    running = serve_handler(
        server.handle,
        "127.0.0.1",
        0,
        tokens=TOKENS,
        on_stream_closed=stream_closed_hook(server),
    )
    try:
        yield server, running
    finally:
        running.stop(grace=1.0)


def _connect(running: RunningServer, name: str) -> GrpcTransport:
    return GrpcTransport(
        running.address, TOKENS[name].token, retry=RetryPolicy(attempts=0), timeout=20
    )


def test_interleaved_ushape_streams_both_train(ushape):
    server, running = ushape
    with _connect(running, "alice") as a, _connect(running, "bob") as b:
        for t, who in ((a, "a"), (b, "b")):
            hello = Message(Kind.HELLO, who, "", 0, meta={"mode": "train", "config": "ushape"})
            assert t.request(hello).kind == Kind.WELCOME
        for t, who in ((a, "a"), (b, "b")):
            forward = Message(Kind.FORWARD, who, "", 1, {"act": _frame(1, (4, 8))})
            assert t.request(forward).kind == Kind.MIDDLE
        for t, who in ((a, "a"), (b, "b")):
            grad = Message(Kind.MIDDLE_GRAD, who, "", 1, {"grad": _frame(2, (4, 6))})
            reply = t.request(grad)
            assert reply.kind == Kind.GRADIENT, reply.meta
    assert server.steps_applied == 2


def test_a_closed_stream_releases_all_but_its_latest_pending_forward(ushape):
    server, running = ushape
    with _connect(running, "alice") as a:
        assert a.request(Message(Kind.HELLO, "s", "", 0, meta={"mode": "train"})).kind == (
            Kind.WELCOME
        )
        for step in range(1, 9):
            forward = Message(Kind.FORWARD, "s", "", step, {"act": _frame(step, (64, 8))})
            assert a.request(forward).kind == Kind.MIDDLE
        held = server.held_bytes("alice")
        assert held > 8 * 64 * 8 * 4  # eight pending forwards, each holding its input at least
    # all but the latest forward (a reconnecting client may still answer it) are released
    assert _wait_until(lambda: server.held_bytes("alice") <= SESSION_OVERHEAD + held // 8)


def test_hello_refusals_reach_the_client_as_replies(ushape):
    _, running = ushape
    with _connect(running, "bob") as b:
        wrong = b.request(Message(Kind.HELLO, "s", "", 0, meta={"config": "vanilla"}))
        assert wrong.kind == Kind.ERROR and wrong.meta["code"] == "FAILED_PRECONDITION"
        assert "trained as vanilla, but the server runs ushape" in wrong.meta["message"]
        early = b.request(Message(Kind.PREDICT, "t", "", 1, {"act": _frame(1, (4, 8))}))
        assert early.kind == Kind.ERROR and "HELLO" in early.meta["message"]
