"""``edgesplit client`` and ``edgesplit status`` against a real gRPC server (in-process CLI)."""

from __future__ import annotations

import json
import logging
import sys
import types

import numpy as np
import pytest

from edgesplit.cli.main import main
from edgesplit.cli.status import print_status
from edgesplit.data import iid_shard_indices


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    """rich wraps tables to the terminal width; a fixed width keeps the text checks stable."""
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() calls logging.basicConfig, which binds a handler to this test's captured stderr;
    drop it afterwards so later tests do not log into a closed stream."""
    root = logging.getLogger()
    before = list(root.handlers)
    yield
    for handler in root.handlers[:]:
        if handler not in before:
            root.removeHandler(handler)


def _error_lines(err: str) -> list[str]:
    """stderr lines of the command, without the in-process test server's log records."""
    return [line for line in err.strip().splitlines()
            if not line.startswith(("WARNING edgesplit.transport", "INFO ", "DEBUG "))]


def _client(exported, served, token, *extra: str) -> list[str]:
    return ["client", "--bundle", str(exported.bundle), "--server", served.address,
            "--token", token, "--data", str(exported.npz), *extra]


def _json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    return json.loads(out[0])


def test_infer_json(vanilla, serve, token, capsys):
    served = serve(vanilla)
    assert main(_client(vanilla, served, token, "--mode", "infer", "--probe-every", "4",
                        "--json")) == 0
    report = _json(capsys)
    # infer mode uses x_test/y_test of the .npz
    assert report["samples"] == len(vanilla.x_test) and report["mode"] == "infer"
    assert report["accuracy"] >= 0.9
    assert report["bytes_up"] > 0 and report["bytes_down"] > 0
    assert report["bytes_up_fp32"] > report["bytes_up"] and report["ratio_up"] > 1
    assert {"compute", "encode", "network"} <= set(report["latency_ms"])
    assert report["probes"] == 4 and report["codec"] == "q8+zstd"
    assert report["server"] == served.address and "pred" not in report
    # bytes_up are the envelopes the transport carried; the server counts the frames in them
    assert report["envelope_up"] > 0 and report["envelope_down"] > 0
    assert served.engine.stats["edge"].bytes_in == report["bytes_up"] - report["envelope_up"]


def test_train_uses_x_y_with_limit_and_shard(vanilla, serve, token, capsys):
    served = serve(vanilla)
    assert main(_client(vanilla, served, token, "--mode", "train", "--limit", "100",
                        "--batch-size", "50", "--json")) == 0
    report = _json(capsys)
    assert (report["samples"], report["batches"], report["mode"]) == (100, 2, "train")
    # gradient replies carry no frame (want_grad is false): bytes_down is all envelope
    assert report["loss"] is not None and report["bytes_down"] - report["envelope_down"] == 0
    assert report["bytes_down"] > 0
    assert served.engine.stats["edge"].samples == 100

    assert main(_client(vanilla, served, token, "--mode", "train", "--shard", "1/4",
                        "--json")) == 0
    shard = iid_shard_indices(len(vanilla.x_train), 1, 4)
    assert _json(capsys)["samples"] == len(shard)


def test_table_output(vanilla, serve, token, capsys):
    served = serve(vanilla)
    assert main(_client(vanilla, served, token, "--limit", "64")) == 0
    captured = capsys.readouterr()
    for text in ("accuracy", "bytes up", "latency (ms)", "network", "per batch"):
        assert text in captured.out
    assert "samples" in captured.err  # the progress bar goes to stderr


def test_token_from_environment(vanilla, serve, token, capsys, monkeypatch):
    served = serve(vanilla)
    monkeypatch.setenv("EDGESPLIT_TOKEN", token)
    args = ["client", "--bundle", str(vanilla.bundle), "--server", served.address,
            "--data", str(vanilla.npz), "--limit", "8", "--json"]
    assert main(args) == 0
    assert _json(capsys)["samples"] == 8
    with pytest.raises(SystemExit):
        main(["client", "--help"])
    assert token not in capsys.readouterr().out  # --help must not print the secret


def test_wrong_token_is_one_line_and_exit_2(vanilla, serve, capsys):
    served = serve(vanilla)
    assert main(_client(vanilla, served, "not-the-token", "--json")) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = _error_lines(captured.err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("edgesplit client: error:") and "--token" in lines[0]
    assert "refused the token" in lines[0]


def test_data_of_the_wrong_shape_is_refused_before_sending(vanilla, serve, token, capsys,
                                                            tmp_path):
    served = serve(vanilla)
    bad = tmp_path / "images.npz"
    np.savez(bad, x=np.zeros((10, 8, 8), np.float32), y=np.zeros(10, np.int64))
    args = _client(vanilla, served, token)
    args[args.index("--data") + 1] = str(bad)
    assert main(args) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    err = lines[0]
    assert "shape (8, 8)" in err and "(64,)" in err
    assert not served.engine.stats  # nothing reached the server


@pytest.mark.parametrize(
    ("arrays", "mode", "match"),
    [
        ({"x": np.zeros((4, 64), np.float32)}, "train", "no array 'y'"),
        ({"y": np.zeros(4, np.int64)}, "infer", "no array 'x'"),
    ],
)
def test_bad_npz(vanilla, serve, token, capsys, tmp_path, arrays, mode, match):
    served = serve(vanilla)
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    args = _client(vanilla, served, token, "--mode", mode)
    args[args.index("--data") + 1] = str(path)
    assert main(args) == 2
    assert match in capsys.readouterr().err


def test_unlabelled_infer_data(vanilla, serve, token, capsys, tmp_path):
    served = serve(vanilla)
    path = tmp_path / "x.npz"
    np.savez(path, x=vanilla.x_test[:20])
    args = _client(vanilla, served, token, "--json")
    args[args.index("--data") + 1] = str(path)
    assert main(args) == 0
    report = _json(capsys)
    assert report["samples"] == report["predictions"] == 20 and report["accuracy"] is None


def test_missing_bundle_and_data(vanilla, tmp_path, capsys):
    base = ["client", "--server", "127.0.0.1:1", "--token", "t"]
    assert main([*base, "--data", str(vanilla.npz)]) == 2
    assert "--bundle DIR is required" in capsys.readouterr().err
    assert main([*base, "--bundle", str(tmp_path), "--data", str(vanilla.npz)]) == 2
    assert "not a bundle" in capsys.readouterr().err
    assert main([*base, "--bundle", str(vanilla.bundle), "--data", "nowhere.npz"]) == 2
    assert "neither an existing .npz file" in capsys.readouterr().err


def test_trainable_hands_over_to_the_torch_client(monkeypatch, tmp_path):
    seen: list = []
    fake = types.ModuleType("edgesplit.cli.trainable")
    fake.run_trainable_client = lambda args: seen.append(args) or 0
    monkeypatch.setitem(sys.modules, "edgesplit.cli.trainable", fake)
    code = main(["client", "--trainable", "--server", "127.0.0.1:1", "--token", "t",
                 "--data", "digits", "--mode", "train", "--config", "splitfed", "--index", "1",
                 "--clients", "3", "--shard", "1/3", "--epochs", "2",
                 "--from", str(tmp_path), "--codec", "q4+zstd"])
    assert code == 0 and len(seen) == 1
    args = seen[0]
    assert (args.config, args.index, args.clients, args.shard, args.epochs) == (
        "splitfed", 1, 3, (1, 3), 2)
    assert args.source == str(tmp_path) and args.codec == "q4+zstd" and args.bundle is None


def test_bad_shard_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["client", "--server", "h:1", "--data", "d", "--shard", "4/4"])
    assert info.value.code == 2
    assert "need 0 <= I < N" in capsys.readouterr().err


def test_status_json_and_table(vanilla, serve, token, capsys):
    served = serve(vanilla)
    assert main(_client(vanilla, served, token, "--mode", "train", "--probe-every", "2",
                        "--limit", "128", "--json")) == 0
    capsys.readouterr()
    assert main(["status", served.address, "--token", token, "--json"]) == 0
    status = _json(capsys)
    assert status["clients"]["edge"]["samples"] == 128
    assert status["last_probe"]["client"] == "edge"

    assert main(["status", served.address, "--token", token]) == 0
    out = capsys.readouterr().out
    for text in ("clients (1)", "edge", "latest probe", "accuracy decoded vs reference",
                 "SNR", "steps_applied"):
        assert text in out, text

    assert main(["status", served.address, "--token", "wrong-token"]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "token" in err[0], err

    # peer's token (role=train only, see conftest) is known but may not read Status
    assert main(["status", served.address, "--token", "peer-token-9876543210"]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "PERMISSION_DENIED" in err[0] and "role=admin" in err[0], err


def test_status_prints_keys_it_does_not_know(capsys):
    status = {
        "config": "vanilla",
        "uptime_s": 12.5,
        "clients": {"edge": {"steps": 3, "samples": 96, "last_seen": 0, "codec": "q4+zstd"}},
        "last_probe": None,
        "probes": {"edge": [{"step": 1, "snr_db": 31.2, "accuracy_decoded": 0.9}]},
        "checkpoint": {"path": "runs/x", "every": 50},
    }
    print_status(status, "h:1", now=100.0)
    out = capsys.readouterr().out
    for text in ("uptime_s", "12.5", "codec", "q4+zstd", "never", "no probe yet", "probes",
                 "31.2", "checkpoint", "runs/x"):
        assert text in out, text
