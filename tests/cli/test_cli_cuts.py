"""``edgesplit cuts``: candidate cuts of built-in and user models, as a table or JSON."""

from __future__ import annotations

import json

from edgesplit.cli.main import main


def test_cuts_of_the_builtin_mlp_as_json(capsys):
    assert main(["cuts", "--data", "digits", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["cut"]: r for r in report["cuts"]}
    assert list(rows) == ["relu1", "relu2"]
    assert rows["relu1"]["shape"] == [128] and rows["relu1"]["bytes_per_sample_fp32"] == 512
    assert rows["relu1"]["client_flops"] == 2 * 64 * 128 + 128   # Linear + ReLU
    assert rows["relu1"]["client_params"] == 64 * 128 + 128


def test_cuts_of_a_custom_forward_model(resnet_file, capsys):
    assert main(["cuts", "--data", "digits", "--model", f"{resnet_file}:build", "--json"]) == 0
    rows = {r["cut"]: r for r in json.loads(capsys.readouterr().out)["cuts"]}
    assert list(rows) == ["stem", "block1", "block2"]
    assert rows["block1"]["shape"] == [8, 8, 8]
    assert rows["block1"]["bytes_per_sample_fp32"] == 8 * 8 * 8 * 4
    assert rows["stem"]["client_flops"] < rows["block1"]["client_flops"] \
        < rows["block2"]["client_flops"]


def test_cuts_table_and_bad_model(resnet_file, capsys):
    assert main(["cuts", "--data", "digits", "--model", f"{resnet_file}:build"]) == 0
    out = capsys.readouterr().out
    assert "block1" in out and "8×8×8" in out
    assert main(["cuts", "--data", "digits", "--model", "nope.py:build"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["edgesplit cuts: error: model file 'nope.py' does not exist"]
