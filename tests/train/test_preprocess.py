"""Raw features train like standardized ones: each client segment standardizes its own input
(statistics from its own rows), in vanilla and vertical alike, and the layer is in the segment
that ships (so a device feeds raw readings)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgesplit.data import load_dataset
from edgesplit.split.preprocess import Standardize, fit_standardize, stats_axes
from edgesplit.train.engine import run_training
from edgesplit.train.spec import TrainSpec


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> dict[str, Path]:  # noqa: ANN001 - pytest's factory
    d = load_dataset("breast_cancer")  # raw: columns span 0.0 to ~4,000
    assert d.x_train.max() > 1000
    m, s = d.x_train.mean(0), d.x_train.std(0)
    root = tmp_path_factory.mktemp("tabular")
    paths = {"raw": root / "raw.npz", "std": root / "std.npz"}
    np.savez(paths["raw"], x=d.x_train, y=d.y_train, x_test=d.x_test, y_test=d.y_test)
    np.savez(paths["std"], x=(d.x_train - m) / s, y=d.y_train, x_test=(d.x_test - m) / s,
             y_test=d.y_test)
    return paths


@pytest.mark.parametrize("config", ["vanilla", "vertical"])
def test_raw_features_reach_the_accuracy_of_standardized_ones(npz, config) -> None:  # noqa: ANN001
    def acc(data: str, normalize: bool = True) -> float:
        spec = TrainSpec(data=str(npz[data]), config=config, clients=2, epochs=5,
                         normalize=normalize)
        return run_training(spec).result.accuracy

    raw, std = acc("raw"), acc("std")
    assert raw >= 0.95 and abs(raw - std) <= 0.015, (raw, std)
    assert acc("raw", normalize=False) < raw - 0.1  # without it, raw columns do not train


def test_the_layer_ships_with_the_client_segment(npz) -> None:  # noqa: ANN001
    trained = run_training(TrainSpec(data=str(npz["raw"]), epochs=1))
    layer = trained.client_segments[0].standardize
    assert isinstance(layer, Standardize)
    x = trained.dataset.x_train
    np.testing.assert_allclose(layer.mean.numpy(), x.mean(0), rtol=1e-5)
    with torch.no_grad():
        z = layer(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-3)


def test_statistics_axes_per_feature_channel_or_image() -> None:
    assert stats_axes((30,)) == (0,)
    assert stats_axes((3, 100)) == (0, 2)  # per channel of a signal
    assert stats_axes((3, 32, 32)) == (0, 2, 3)  # per channel of an image
    assert stats_axes((28, 28)) == (0, 1, 2)  # one pair for a single-channel image
    constant = fit_standardize(np.ones((10, 4), np.float32))
    assert torch.equal(constant.std, torch.ones(4))  # constant columns are only centred
