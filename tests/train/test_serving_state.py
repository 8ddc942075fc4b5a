"""``serve --state DIR``: a damaged state file is never loaded silently."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from edgesplit.cli.main import main
from edgesplit.errors import ConfigError
from edgesplit.train.serving import STATE_FILE, StateStore, server_fresh
from edgesplit.train.spec import TrainSpec
from edgesplit.train.state_file import StateFileError, read_checked, write_checked


def _server():
    server, _ = server_fresh(TrainSpec())
    return server


def _first_weight(server) -> torch.Tensor:
    return next(iter(server.segment.parameters())).detach().clone()


def _two_saves(directory: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Save at step 5, change the weights, save at step 7; return both weight snapshots."""
    server = _server()
    store = StateStore(directory, server)
    server.steps_applied = 5
    store.save()
    at5 = _first_weight(server)
    with torch.no_grad():
        next(iter(server.segment.parameters())).add_(1.0)
    server.steps_applied = 7
    store.save()
    return at5, _first_weight(server)


def _flip(path: Path, where: float = 0.6) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_round_trip_restores_the_newest(tmp_path: Path) -> None:
    _, at7 = _two_saves(tmp_path)
    fresh = _server()
    assert StateStore(tmp_path, fresh).load()
    assert fresh.steps_applied == 7
    assert torch.equal(_first_weight(fresh), at7)
    assert (tmp_path / (STATE_FILE + ".prev")).exists()


def test_flipped_byte_falls_back_to_previous_good(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    at5, _ = _two_saves(tmp_path)
    _flip(tmp_path / STATE_FILE)
    fresh = _server()
    store = StateStore(tmp_path, fresh)
    with caplog.at_level(logging.WARNING):
        assert store.load()
    assert fresh.steps_applied == 5
    assert torch.equal(_first_weight(fresh), at5)
    assert store.loaded_from == tmp_path / (STATE_FILE + ".prev")
    assert "server-state.pt is corrupt: sha256" in caplog.text
    assert "falling back to the previous good state" in caplog.text
    # the bad file is set aside, so the next save cannot rotate it over the good one
    assert (tmp_path / (STATE_FILE + ".corrupt")).exists()
    fresh.steps_applied = 6
    store.save()
    assert StateStore(tmp_path, _server()).load()


def test_truncated_file_says_truncated_not_errno(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _two_saves(tmp_path)
    path = tmp_path / STATE_FILE
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(StateFileError, match="truncated or padded: its header promises"):
        read_checked(path)
    fresh = _server()
    with caplog.at_level(logging.WARNING):
        assert StateStore(tmp_path, fresh).load()
    assert fresh.steps_applied == 5 and "falling back" in caplog.text


def test_neither_good_refuses(tmp_path: Path) -> None:
    _two_saves(tmp_path)
    _flip(tmp_path / STATE_FILE)
    prev = tmp_path / (STATE_FILE + ".prev")
    prev.write_bytes(prev.read_bytes()[:10])
    with pytest.raises(ConfigError, match="no good state file.*corrupt.*no 'EDGESPLIT-STATE'"):
        StateStore(tmp_path, _server()).load()


def test_header_damage_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "x"
    write_checked(path, b"payload")
    assert read_checked(path) == b"payload"
    with pytest.raises(StateFileError, match="does not exist"):
        read_checked(tmp_path / "absent")
    path.write_bytes(b"EDGESPLIT-STATE 1 7 nothex\npayload")
    with pytest.raises(StateFileError, match="corrupt"):
        read_checked(path)
    path.write_bytes(b"EDGESPLIT-STATE one 7 ab\npayload")
    with pytest.raises(StateFileError, match="damaged checksum header"):
        read_checked(path)


def test_cli_refuses_in_one_line_when_nothing_is_good(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "st"
    state.mkdir()
    (state / STATE_FILE).write_bytes(b"\x80\x02garbage")
    rc = main(["serve", "--data", "digits", "--no-auth", "--port", "0", "--state", str(state)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("edgesplit serve: error: cannot restore server state")
    assert "Traceback" not in "\n".join(err) and "Errno" not in err[-1]


def test_corrupt_fallback_is_reported_while_the_newest_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, at7 = _two_saves(tmp_path)
    _flip(tmp_path / (STATE_FILE + ".prev"))
    fresh = _server()
    with caplog.at_level(logging.WARNING):
        assert StateStore(tmp_path, fresh).load()
    assert fresh.steps_applied == 7 and torch.equal(_first_weight(fresh), at7)
    assert "fallback state file is not usable" in caplog.text
    assert "server-state.pt.prev is corrupt" in caplog.text
