from __future__ import annotations

import json

import numpy as np
import pytest

KEYS = {
    "accuracy",
    "loss",
    "bytes_up",
    "bytes_down",
    "bytes_up_fp32",
    "bytes_down_fp32",
    "ratio_up",
    "ratio_down",
    "cut_shape",
    "config",
    "codec",
    "grad_codec",
    "clients",
}


def test_train_json_and_save(cli, tmp_path):
    out = cli(
        "train",
        "--clients",
        "2",
        "--epochs",
        "2",
        "--codec",
        "q8+zstd",
        "--json",
        "--save",
        str(tmp_path / "ck"),
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result.keys() >= KEYS
    assert 0 <= result["accuracy"] <= 1 and result["cut_shape"] == [128]
    assert [c["client"] for c in result["clients"]] == ["client-0", "client-1"]
    assert result["bytes_up"] == sum(c["bytes_up"] for c in result["clients"])
    assert result["ratio_up"] > 3
    assert (tmp_path / "ck" / "checkpoint.json").exists()


def test_train_table_output(cli):
    out = cli("train", "--epochs", "1")
    assert out.returncode == 0, out.stderr
    assert "test accuracy" in out.stdout and "client-0" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--codec", "q3+zstd"], "q3"),
        (["--cut", "nope"], "valid cuts"),
        (["--config", "diagonal"], "unknown config 'diagonal'"),
        (["--data", "missing.npz"], "neither a built-in"),
        (["--model", "resnet"], "unknown model"),
        (["--config", "vertical", "--clients", "1"], "at least 2 parties"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cli, args, message):
    out = cli("train", "--epochs", "1", *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgesplit train: error:"), out.stderr
    assert message in lines[0]


def test_bad_npz_is_one_line(cli, tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((5, 3)), y=np.zeros(4, dtype=int))
    out = cli("train", "--data", str(path), "--epochs", "1")
    assert out.returncode == 2 and "x has 5 samples but y has 4" in out.stderr


def test_help_lists_defaults(cli):
    out = cli("train", "--help")
    assert out.returncode == 0 and "(default: vanilla)" in out.stdout
