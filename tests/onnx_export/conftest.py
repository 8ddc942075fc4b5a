"""One short digits training shared by the export tests (training dominates their runtime)."""

from __future__ import annotations

import pytest

from edgesplit.train.engine import run_training
from edgesplit.train.spec import TrainSpec


@pytest.fixture(scope="session")
def digits_trained():
    """vanilla digits MLP, 3 epochs, q8+zstd activations (~0.9 test accuracy)."""
    return run_training(TrainSpec(epochs=3, codec="q8+zstd"))
