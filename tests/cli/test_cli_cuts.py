"""``edgesplit cuts``: candidate cuts of built-in and user models, as a table or JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgesplit.cli.main import main

RESNET = '''
import torch
from torch import nn

class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))

class TinyResNet(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.block1 = Block(8)
        self.block2 = Block(8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        if x.dim() == 2:
            x = x.reshape(x.shape[0], 1, 8, 8)
        x = self.block2(self.block1(torch.relu(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))

def build(input_shape, num_classes):
    return TinyResNet(num_classes)
'''


@pytest.fixture
def resnet_file(tmp_path: Path) -> Path:
    path = tmp_path / "resnet_tiny.py"
    path.write_text(RESNET)
    return path


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
