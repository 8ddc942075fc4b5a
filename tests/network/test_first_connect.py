"""A client whose first connection is refused (no server on the port) says so at once, in one
line; backoff is kept for reconnecting to a server that answered before."""

from __future__ import annotations

import socket
import time

import pytest

from edgesplit.cli.main import main
from edgesplit.errors import TransportError
from edgesplit.transport.grpc_client import GrpcTransport, RetryPolicy
from edgesplit.transport.grpc_server import serve_handler
from edgesplit.wire.messages import Kind, Message

TOKEN = "first-connect-token-0123456789"


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ack(message: Message) -> Message:
    return Message(Kind.ACK, message.session, message.client, message.step)


def test_a_refused_first_connection_fails_at_once_in_one_line():
    port = closed_port()
    # the default policy would wait ~60 s over 8 attempts before giving up
    transport = GrpcTransport(f"127.0.0.1:{port}", TOKEN)
    assert transport.retry.budget > 30
    start = time.monotonic()
    with pytest.raises(TransportError) as info:
        transport.request(Message(Kind.HELLO, "s", "", 0, meta={"mode": "infer"}))
    assert time.monotonic() - start < 5
    assert str(info.value) == (f"cannot reach 127.0.0.1:{port} (connection refused): is "
                               "`edgesplit serve` running?")
    assert transport.reconnects == 0 and transport.resends == 0 and not transport.reached
    transport.close()


def test_the_client_command_says_it_in_one_line(capsys):
    port = closed_port()
    start = time.monotonic()
    rc = main(["client", "--trainable", "--server", f"127.0.0.1:{port}", "--token", TOKEN,
               "--data", "digits"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and time.monotonic() - start < 30
    assert err == [f"edgesplit client: error: cannot reach 127.0.0.1:{port} (connection "
                   "refused): is `edgesplit serve` running?"]


def test_a_server_that_answered_before_is_retried_with_backoff():
    running = serve_handler(ack, "127.0.0.1", 0)
    target = f"127.0.0.1:{running.port}"
    policy = RetryPolicy(attempts=2, initial_backoff=0.05, max_backoff=0.1)
    transport = GrpcTransport(target, None, retry=policy, timeout=10)
    assert transport.request(Message(Kind.HELLO, "s", "", 0)).kind == Kind.ACK
    assert transport.reached
    running.stop(None)
    # the same refused connection, now of a session that existed: a restart, so back off
    with pytest.raises(TransportError, match=r"after 3 attempt\(s\).*(?i:connection refused)"):
        transport.request(Message(Kind.PREDICT, "s", "", 1))
    assert transport.reconnects == 2 and transport.resends == 2
    transport.close()
