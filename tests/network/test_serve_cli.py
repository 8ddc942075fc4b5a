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


def test_codec_options_with_a_checkpoint_are_refused_before_loading_it(
        tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    # the checkpoint does not exist: the codec refusal must come first, not be ignored
    rc = main(["serve", "--from", str(tmp_path / "absent"), "--no-auth", "--port", "0",
               "--codec", "q5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0] == ("edgesplit serve: error: --codec: only for a fresh server; a server from "
                      "--from uses the codecs its checkpoint was trained with (drop it)")
