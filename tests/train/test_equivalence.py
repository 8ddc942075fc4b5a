"""Split training with fp32 both ways is ordinary training, cut in two: same weights."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from edgesplit.data import load_dataset
from edgesplit.models import build_model
from edgesplit.split.preprocess import fit_standardize
from edgesplit.train.engine import batches, run_training
from edgesplit.train.spec import TrainSpec


def centralized(spec: TrainSpec) -> nn.Module:
    data = load_dataset(spec.data)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, data.input_shape, data.num_classes)
    # the same input standardization the client segment starts with (one client: every row)
    model = nn.Sequential(
        OrderedDict([("standardize", fit_standardize(data.x_train)), ("lower", model)])
    )
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(spec.epochs):
        rng = np.random.default_rng([spec.seed, epoch, 0])
        for idx in batches(len(data.y_train), spec.batch_size, rng):
            x, y = torch.from_numpy(data.x_train[idx]), torch.from_numpy(data.y_train[idx])
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    return model


@pytest.mark.parametrize("config", ["vanilla", "ushape"])
def test_fp32_split_training_gives_the_same_weights(config):
    spec = TrainSpec(config=config, clients=1, epochs=2, codec="fp32", grad_codec="fp32", seed=3)
    trained = run_training(spec)
    reference = centralized(spec).state_dict()
    split_state = {}
    for seg in [trained.client_segments[0], trained.server_segment, trained.head]:
        if seg is not None:
            for name, value in seg.state_dict().items():
                # the client segment is (standardize, lower): the same names as the reference
                ours = name.startswith(("standardize.", "lower."))
                split_state[name if ours else f"lower.{name}"] = value
    assert split_state.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(split_state[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # and training did move the weights (the comparison is not trivially true)
    torch.manual_seed(spec.seed)
    init = build_model("auto", (64,), 10).state_dict()
    assert not torch.allclose(init["fc1.weight"], reference["lower.fc1.weight"])


def test_lossy_codec_changes_the_weights():
    spec = TrainSpec(config="vanilla", clients=1, epochs=1, codec="q2+zstd", seed=3)
    trained = run_training(spec)
    reference = centralized(spec).state_dict()
    assert not torch.allclose(
        trained.server_segment.state_dict()["fc2.weight"], reference["lower.fc2.weight"]
    )
