"""TLS and mutual TLS on the gRPC transport, with a throwaway CA (the ``pki`` fixture of
tests/conftest.py, made by the openssl CLI)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgesplit.errors import ConfigError, TransportError
from edgesplit.transport.grpc_client import GrpcTransport, RetryPolicy, fetch_status
from edgesplit.transport.grpc_server import RunningServer, serve_handler
from edgesplit.transport.tokens import Role, TlsConfig, TokenGrant
from edgesplit.wire.messages import Kind, Message

TOKENS = {"edge-1": "tls-token-0123456789"}
# What the server holds: 'edge-1' also reads Status (role=admin), the others only train.
SERVED = {**TOKENS, "edge-1": TokenGrant(TOKENS["edge-1"], frozenset({Role.TRAIN, Role.ADMIN}))}
NO_RETRY = RetryPolicy(attempts=0)


def echo(message: Message) -> Message:
    return Message(Kind.ACK, message.session, message.client, message.step,
                   dict(message.tensors), {"client": message.client})


@pytest.fixture
def tls_server(pki: Path) -> Iterator[RunningServer]:
    srv = serve_handler(echo, "127.0.0.1", 0, tokens=SERVED,
                        tls=TlsConfig(cert=pki / "server.pem", key=pki / "server.key"))
    yield srv
    srv.stop(None)


@pytest.fixture
def mtls_server(pki: Path) -> Iterator[RunningServer]:
    srv = serve_handler(echo, "127.0.0.1", 0, tokens=SERVED, tls=TlsConfig(
        cert=pki / "server.pem", key=pki / "server.key", ca=pki / "ca.pem"))
    yield srv
    srv.stop(None)


def ping(t: GrpcTransport) -> Message:
    return t.request(Message(Kind.FORWARD, "s", "", 1, {"act": b"\x01\x02\x03"}))


def test_tls_round_trip(pki: Path, tls_server: RunningServer) -> None:
    assert tls_server.tls
    target = f"127.0.0.1:{tls_server.port}"
    with GrpcTransport(target, TOKENS["edge-1"], tls=TlsConfig(ca=pki / "ca.pem"),
                       retry=NO_RETRY) as t:
        reply = ping(t)
    assert reply.tensors == {"act": b"\x01\x02\x03"} and reply.meta["client"] == "edge-1"
    status = fetch_status(target, TOKENS["edge-1"], tls=TlsConfig(ca=pki / "ca.pem"))
    assert status == {}


def test_tls_server_name_override(pki: Path, tls_server: RunningServer) -> None:
    # dial by IP, check the certificate against its DNS name
    with GrpcTransport(f"127.0.0.1:{tls_server.port}", TOKENS["edge-1"], tls=TlsConfig(
                       ca=pki / "ca.pem", server_name="localhost"), retry=NO_RETRY) as t:
        assert ping(t).step == 1


def test_tls_server_untrusted_by_client(pki: Path, tls_server: RunningServer) -> None:
    target = f"127.0.0.1:{tls_server.port}"
    # a certificate the client does not trust is not retried: the next attempt sees it again
    with GrpcTransport(target, TOKENS["edge-1"], tls=TlsConfig(ca=pki / "other-ca.pem"),
                       retry=RetryPolicy(attempts=3, initial_backoff=0.01), timeout=5) as t:
        with pytest.raises(TransportError, match="TLS handshake .* failed.*--tls-ca"):
            ping(t)
        assert t.reconnects == 0


def test_plaintext_client_cannot_talk_to_tls_server(tls_server: RunningServer) -> None:
    with GrpcTransport(f"127.0.0.1:{tls_server.port}", TOKENS["edge-1"], retry=NO_RETRY,
                       timeout=5) as t, pytest.raises(TransportError, match="pass --tls-ca"):
        ping(t)


def test_mtls_round_trip(pki: Path, mtls_server: RunningServer) -> None:
    with GrpcTransport(f"127.0.0.1:{mtls_server.port}", TOKENS["edge-1"],
                       tls=TlsConfig(ca=pki / "ca.pem", cert=pki / "client.pem",
                                     key=pki / "client.key"), retry=NO_RETRY) as t:
        assert ping(t).meta["client"] == "edge-1"


@pytest.mark.parametrize("identity", [None, "rogue"])
def test_mtls_refuses_client_without_a_trusted_certificate(
    pki: Path, mtls_server: RunningServer, identity: str | None
) -> None:
    kw = {} if identity is None else {
        "cert": pki / f"{identity}.pem", "key": pki / f"{identity}.key"}
    with GrpcTransport(f"127.0.0.1:{mtls_server.port}", TOKENS["edge-1"],
                       tls=TlsConfig(ca=pki / "ca.pem", **kw), retry=NO_RETRY,
                       timeout=5) as t, \
            pytest.raises(TransportError, match="--tls-cert"):
        ping(t)


def test_mtls_still_checks_the_token(pki: Path, mtls_server: RunningServer) -> None:
    with GrpcTransport(f"127.0.0.1:{mtls_server.port}", "some-other-token-xyz",
                       tls=TlsConfig(ca=pki / "ca.pem", cert=pki / "client.pem",
                                     key=pki / "client.key"), retry=NO_RETRY) as t, \
            pytest.raises(TransportError, match="unauthenticated"):
        ping(t)


def test_missing_tls_files_are_config_errors(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        serve_handler(echo, "127.0.0.1", 0, tls=TlsConfig(cert=tmp_path / "nope.pem",
                                                           key=pki / "server.key"))
    with pytest.raises(ConfigError, match="--tls-key"):
        serve_handler(echo, "127.0.0.1", 0, tls=TlsConfig(cert=pki / "server.pem"))
    with pytest.raises(ConfigError, match="TLS CA certificate file"):
        GrpcTransport("127.0.0.1:1", "tok", tls=TlsConfig(ca=tmp_path / "missing-ca.pem"))


def test_tls_config_says_when_tls_is_on(pki: Path) -> None:
    assert TlsConfig().load("client") is None and TlsConfig().load("server") is None
    assert TlsConfig(system_roots=True).load("client") is not None   # system roots, no files
    files = TlsConfig(ca=pki / "ca.pem").load("client")
    assert files is not None and files.ca == (pki / "ca.pem").read_bytes() and files.cert is None
    with pytest.raises(ConfigError, match="server_name and system_roots are client TLS"):
        TlsConfig(cert=pki / "server.pem", key=pki / "server.key",
                  server_name="localhost").load("server")

