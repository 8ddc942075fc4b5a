from __future__ import annotations

import pytest
import torch
from torch import nn

from edgesplit.errors import ConfigError
from edgesplit.models import build_model
from edgesplit.split.cut import check_chain, cut_model, cut_ushape, parse_cuts, valid_cuts


@pytest.mark.parametrize("shape", [(64,), (3, 40), (1, 12, 12), (28, 28)])
def test_split_output_equals_unsplit(shape):
    torch.manual_seed(0)
    model = build_model("auto", shape, 5)
    x = torch.randn(4, *shape)
    for cut in valid_cuts(model):
        lower, upper = cut_model(model, cut)
        torch.testing.assert_close(upper(lower(x)), model(x), rtol=0, atol=0)


def test_ushape_three_segments_equal_unsplit():
    model = build_model("mlp", (10,), 3)
    a, b, c = cut_ushape(model, "relu1", "relu2")
    x = torch.randn(6, 10)
    torch.testing.assert_close(c(b(a(x))), model(x), rtol=0, atol=0)


def test_segments_share_parameters_with_model():
    model = build_model("mlp", (10,), 3)
    lower, _ = cut_model(model, "relu1")
    assert lower.fc1.weight is model.fc1.weight


def test_bad_cut_lists_valid_names():
    model = build_model("mlp", (10,), 3)
    with pytest.raises(ConfigError, match=r"'nope'.*fc1, relu1, fc2, relu2"):
        cut_model(model, "nope")
    with pytest.raises(ConfigError, match="last layer"):
        cut_model(model, "fc3")
    with pytest.raises(ConfigError, match="forward order"):
        cut_ushape(model, "relu2", "relu1")


def test_parse_cuts_counts_names_per_config():
    assert parse_cuts("relu1,relu2", "ushape", None) == ("relu1", "relu2")
    assert parse_cuts(None, "vanilla", "relu1") == ("relu1",)
    with pytest.raises(ConfigError, match="takes 2 cut names"):
        parse_cuts("relu1", "ushape", None)


def test_valid_cuts_keep_client_non_trivial():
    model = build_model("cnn2d", (1, 16, 16), 4)
    cuts = valid_cuts(model)
    assert cuts[0] == "relu1" and "fc2" not in cuts and "conv1" not in cuts


def test_skip_over_the_cut_is_refused_with_what_crosses():
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.a(x)) + x

    model = Skip()
    check_chain(model, torch.randn(2, 4))   # fx traces it: not refused as a model
    with pytest.raises(ConfigError, match="the model's input crosses the cut"):
        cut_model(model, "a")
