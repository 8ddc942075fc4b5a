"""``edgesplit serve`` refuses what it cannot do safely: one readable line, exit 2."""

from __future__ import annotations

import socket

import pytest

from edgesplit.cli.main import main


def test_serve_on_a_port_in_use_refuses_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        rc = main(["serve", "--data", "digits", "--no-auth", "--host", "127.0.0.1",
                   "--port", str(port)])
    out = capsys.readouterr()
    assert rc == 2
    assert "listening on" not in out.out
    lines = out.err.strip().splitlines()
    assert lines[-1] == (
        f"edgesplit serve: error: cannot listen on 127.0.0.1:{port}: the port is in use "
        "(another server?) or the address is not local; pick another --port or stop the "
        "other server"
    )
    assert "Traceback" not in out.err


@pytest.mark.parametrize(("flag", "value", "expected"), [
    ("--idle-timeout", "0", "idle_timeout must be positive"),
    ("--max-streams-per-client", "0", "must be positive"),
    ("--max-meta-kib", "0", "max_meta_bytes must be positive"),
])
def test_bad_limits_are_one_line(flag: str, value: str, expected: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["serve", "--data", "digits", "--no-auth", "--port", "0", flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and expected in err[-1] and err[-1].startswith("edgesplit serve: error:")
