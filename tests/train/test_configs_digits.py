"""The acceptance bar on digits: every configuration learns; compression costs little."""

from __future__ import annotations

import pytest

from edgesplit.train.engine import run_training
from edgesplit.train.spec import TrainSpec

RUNS: dict[tuple[str, str], object] = {}


def result(config: str, codec: str, clients: int):
    key = (config, codec)
    if key not in RUNS:
        RUNS[key] = run_training(
            TrainSpec(config=config, clients=clients, codec=codec, seed=0)
        ).result
    return RUNS[key]


CLIENTS = {"vanilla": 3, "ushape": 2, "vertical": 2, "splitfed": 3}


@pytest.mark.parametrize("config", list(CLIENTS))
def test_every_config_reaches_95_percent_with_fp32(config):
    r = result(config, "fp32", CLIENTS[config])
    assert r.accuracy >= 0.95, r.history
    assert r.bytes_up == r.bytes_up_fp32  # fp32 is the baseline itself
    assert len(r.clients) == CLIENTS[config]
    assert all(c.bytes_up > 0 and c.bytes_down > 0 for c in r.clients)


def test_q4_within_one_point_of_fp32():
    assert result("vanilla", "q4+zstd", 3).accuracy >= result("vanilla", "fp32", 3).accuracy - 0.01


def test_q2_moves_25x_fewer_bytes_and_stays_within_two_points():
    fp32, q2 = result("vanilla", "fp32", 3), result("vanilla", "q2+zstd", 3)
    assert q2.accuracy >= fp32.accuracy - 0.02
    assert fp32.bytes_up / q2.bytes_up >= 25, (fp32.bytes_up, q2.bytes_up)
    assert q2.ratio_up >= 25
    assert q2.bytes_up_fp32 == fp32.bytes_up_fp32  # same tensors, same baseline
