"""A server address without a port is refused in one line (gRPC would silently dial 443)."""

from __future__ import annotations

import pytest

from edgesplit.cli.main import main
from edgesplit.errors import ConfigError
from edgesplit.transport.grpc_client import GrpcTransport, check_target, fetch_status


@pytest.mark.parametrize("target", ["localhost:50051", "10.0.0.7:1", "[::1]:65535",
                                    "dns:///edge.example:443", "unix:/tmp/edgesplit.sock"])
def test_addresses_with_a_port_pass(target: str) -> None:
    assert check_target(target) == target


@pytest.mark.parametrize(("target", "message"), [
    ("localhost", r"'localhost' has no port: give HOST:PORT, e.g. localhost:50051"),
    ("localhost:", r"'localhost:' has no port"),
    (":50051", r"':50051' has no port"),
    ("localhost:http", r"the port must be a number in 1\.\.65535"),
    ("localhost:70000", r"the port must be a number in 1\.\.65535"),
    ("localhost:0", r"the port must be a number in 1\.\.65535"),
    ("::1", r"IPv6 address needs brackets"),
    ("", r"has no port"),
])
def test_addresses_without_a_usable_port_are_refused(target: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_target(target)


def test_the_library_refuses_too() -> None:
    with pytest.raises(ConfigError, match="has no port"):
        GrpcTransport("localhost", None)
    with pytest.raises(ConfigError, match="has no port"):
        fetch_status("localhost", None)


@pytest.mark.parametrize("argv", [
    ["client", "--server", "localhost", "--bundle", "no-such-bundle", "--data", "x.npz"],
    ["status", "localhost"],
])
def test_cli_refuses_in_one_line_before_any_work(argv: list[str],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # the bundle does not exist: the address must be refused first, without a connection try
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"edgesplit {argv[0]}: error: server address 'localhost' has no port: give "
                   "HOST:PORT, e.g. localhost:50051 (without one gRPC would dial port 443)"]
