from __future__ import annotations

import json

import pytest
import torch

from edgesplit.errors import ConfigError
from edgesplit.train.checkpoint import load_checkpoint, save_checkpoint
from edgesplit.train.engine import run_training
from edgesplit.train.spec import TrainSpec


@pytest.mark.parametrize("config", ["vanilla", "ushape", "vertical"])
def test_checkpoint_round_trip(tmp_path, config):
    trained = run_training(TrainSpec(config=config, clients=2, epochs=1))
    path = save_checkpoint(tmp_path / "ck", trained)
    loaded = load_checkpoint(path)
    x = torch.from_numpy(trained.dataset.x_test[:5])
    for original, restored in zip(
        trained.client_segments[-len(loaded.parts.lowers) :], loaded.parts.lowers, strict=True
    ):
        lo, hi = (
            loaded.parts.blocks[loaded.parts.lowers.index(restored)]
            if config == "vertical"
            else (0, x.shape[-1])
        )
        torch.testing.assert_close(original(x[..., lo:hi]), restored(x[..., lo:hi]))
    assert json.loads((path / "checkpoint.json").read_text())["result"]["config"] == config


def test_missing_or_foreign_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="not a checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.json").write_text('{"schema": 99}')
    with pytest.raises(ConfigError, match="schema"):
        load_checkpoint(tmp_path)
