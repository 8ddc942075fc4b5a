"""A refitted entropy model is sent only when it pays for itself."""

from __future__ import annotations

import numpy as np
import torch

from edgesplit.codecs.entropy import EntropyModel
from edgesplit.train.frames import TensorCodec


def skewed(seed: int, bias: float, n: int = 512) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy((1 / (1 + np.exp(-rng.normal(bias, 1.0, (n, 8))))).astype(np.float32))


def test_a_model_that_saves_less_than_it_costs_is_not_sent() -> None:
    codec = TensorCodec.from_spec("fq:2,ans", measure_snr=False)
    for seed in range(4):
        codec.encode(skewed(seed, 2.0), fit=True)
    first = codec.refit()
    assert first is not None  # the first model replaces plain packing
    for seed in range(4, 8):  # the same distribution again
        codec.encode(skewed(seed, 2.0), fit=True)
    assert codec.refit() is None
    assert codec.codec.value.model_id == first.model_id  # frames keep using the first model
    for seed in range(8, 12):  # the codes moved to the other end of the range
        codec.encode(skewed(seed, -2.0), fit=True)
    moved = codec.refit()
    assert moved is not None and moved.model_id != first.model_id


def test_coded_bits_is_the_cross_entropy() -> None:
    model = EntropyModel(np.array([[1, 1, 2, 4]], dtype=np.uint16))
    counts = np.array([[0, 0, 0, 8]])
    assert model.coded_bits(counts) == 8.0  # p = 1/2 for code 3: one bit each
