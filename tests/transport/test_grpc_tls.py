"""TLS and mutual TLS on the gRPC transport, with a throwaway CA made by the openssl CLI.

The ``cryptography`` package is not a dependency; ``openssl`` is on every CI image we use. If it
is missing the tests fail (not skip): TLS must be tested somewhere.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgesplit.errors import ConfigError, TransportError
from edgesplit.transport.grpc_client import GrpcTransport, RetryPolicy, fetch_status
from edgesplit.transport.grpc_server import RunningServer, serve_handler
from edgesplit.wire.messages import Kind, Message

TOKENS = {"edge-1": "tls-token-0123456789"}
NO_RETRY = RetryPolicy(attempts=0)
_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(args: list[str], cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _leaf(cwd: Path, name: str, ca: str, ext: str) -> None:
    """A key + certificate called ``name`` signed by the CA ``ca``, with extensions ``ext``."""
    _openssl(["req", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr",
              "-subj", f"/CN={name}"], cwd)
    (cwd / f"{name}.ext").write_text(ext)
    _openssl(["x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
              "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
              "-extfile", f"{name}.ext"], cwd)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.fail("the TLS tests need the openssl CLI on PATH to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other-ca"):
        _openssl(["req", "-x509", *_EC, "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
                  "-days", "2", "-subj", f"/CN=edgesplit test {ca}"], d)
    _leaf(d, "server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                             "extendedKeyUsage=serverAuth\n")
    _leaf(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _leaf(d, "rogue", "other-ca", "extendedKeyUsage=clientAuth\n")
    return d


def echo(message: Message) -> Message:
    return Message(Kind.ACK, message.session, message.client, message.step,
                   dict(message.tensors), {"client": message.client})


@pytest.fixture
def tls_server(pki: Path) -> Iterator[RunningServer]:
    srv = serve_handler(echo, "127.0.0.1", 0, tokens=TOKENS,
                        tls_cert=pki / "server.pem", tls_key=pki / "server.key")
    yield srv
    srv.stop(None)


@pytest.fixture
def mtls_server(pki: Path) -> Iterator[RunningServer]:
    srv = serve_handler(echo, "127.0.0.1", 0, tokens=TOKENS, tls_cert=pki / "server.pem",
                        tls_key=pki / "server.key", tls_ca=pki / "ca.pem")
    yield srv
    srv.stop(None)


def ping(t: GrpcTransport) -> Message:
    return t.request(Message(Kind.FORWARD, "s", "", 1, {"act": b"\x01\x02\x03"}))


def test_tls_round_trip(pki: Path, tls_server: RunningServer) -> None:
    assert tls_server.tls
    target = f"127.0.0.1:{tls_server.port}"
    with GrpcTransport(target, TOKENS["edge-1"], tls_ca=pki / "ca.pem", retry=NO_RETRY) as t:
        reply = ping(t)
    assert reply.tensors == {"act": b"\x01\x02\x03"} and reply.meta["client"] == "edge-1"
    status = fetch_status(target, TOKENS["edge-1"], tls_ca=pki / "ca.pem")
    assert status == {}


def test_tls_server_name_override(pki: Path, tls_server: RunningServer) -> None:
    # dial by IP, check the certificate against its DNS name
    with GrpcTransport(f"127.0.0.1:{tls_server.port}", TOKENS["edge-1"], tls_ca=pki / "ca.pem",
                       tls_server_name="localhost", retry=NO_RETRY) as t:
        assert ping(t).step == 1


def test_tls_server_untrusted_by_client(pki: Path, tls_server: RunningServer) -> None:
    target = f"127.0.0.1:{tls_server.port}"
    # a certificate the client does not trust is not retried: the next attempt sees it again
    with GrpcTransport(target, TOKENS["edge-1"], tls_ca=pki / "other-ca.pem",
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
                       tls_ca=pki / "ca.pem", tls_cert=pki / "client.pem",
                       tls_key=pki / "client.key", retry=NO_RETRY) as t:
        assert ping(t).meta["client"] == "edge-1"


@pytest.mark.parametrize("identity", [None, "rogue"])
def test_mtls_refuses_client_without_a_trusted_certificate(
    pki: Path, mtls_server: RunningServer, identity: str | None
) -> None:
    kw = {} if identity is None else {
        "tls_cert": pki / f"{identity}.pem", "tls_key": pki / f"{identity}.key"}
    with GrpcTransport(f"127.0.0.1:{mtls_server.port}", TOKENS["edge-1"],
                       tls_ca=pki / "ca.pem", retry=NO_RETRY, timeout=5, **kw) as t, \
            pytest.raises(TransportError, match="--tls-cert"):
        ping(t)


def test_mtls_still_checks_the_token(pki: Path, mtls_server: RunningServer) -> None:
    with GrpcTransport(f"127.0.0.1:{mtls_server.port}", "some-other-token-xyz",
                       tls_ca=pki / "ca.pem", tls_cert=pki / "client.pem",
                       tls_key=pki / "client.key", retry=NO_RETRY) as t, \
            pytest.raises(TransportError, match="unauthenticated"):
        ping(t)


def test_missing_tls_files_are_config_errors(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        serve_handler(echo, "127.0.0.1", 0, tls_cert=tmp_path / "nope.pem",
                      tls_key=pki / "server.key")
    with pytest.raises(ConfigError, match="--tls-key"):
        serve_handler(echo, "127.0.0.1", 0, tls_cert=pki / "server.pem")
    with pytest.raises(ConfigError, match="TLS CA certificate file"):
        GrpcTransport("127.0.0.1:1", "tok", tls_ca=tmp_path / "missing-ca.pem")
