"""Cutting models that are not an nn.Sequential: a custom forward traced with torch.fx."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

from edgesplit.errors import ConfigError
from edgesplit.split.cut import check_chain, cut_model, cut_ushape, valid_cuts


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.bn(self.conv1(x)))))


class TinyResNet(nn.Module):
    """Residual blocks, a reshape of flat input, functional ops between modules."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.layers = nn.Sequential(Block(8), Block(8))
        self.block3 = Block(8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:   # shape-dependent branch: resolved while tracing
            x = x.reshape(x.shape[0], 1, 8, 8)
        x = self.block3(self.layers(torch.relu(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


def _model() -> TinyResNet:
    torch.manual_seed(0)
    return TinyResNet().eval()


@pytest.mark.parametrize("cut", ["stem", "layers.0", "layers.1", "block3"])
def test_segments_compose_to_the_custom_forward(cut):
    model = _model()
    x = torch.randn(5, 64)
    client, server = cut_model(model, cut, input_shape=(64,))
    torch.testing.assert_close(server(client(x)), model(x), rtol=0, atol=0)


def test_segments_are_graph_modules_sharing_parameters():
    model = _model()
    client, server = cut_model(model, "layers.0", input_shape=(64,))
    assert isinstance(client, fx.GraphModule) and isinstance(server, fx.GraphModule)
    assert client.get_submodule("stem").weight is model.stem.weight
    assert set(client.state_dict()) >= {"stem.weight", "layers.0.conv1.weight"}
    assert not any(k.startswith(("head", "block3")) for k in client.state_dict())
    # a deep copy (one per client) works and is independent
    other = copy.deepcopy(client)
    assert other.get_submodule("stem").weight is not model.stem.weight


def test_gradients_reach_both_segments():
    model = _model().train()
    client, server = cut_model(model, "layers.1", input_shape=(64,))
    cut = client(torch.randn(4, 64))
    sent = cut.detach().requires_grad_()
    server(sent).sum().backward()
    cut.backward(sent.grad)
    assert model.stem.weight.grad is not None and model.head.weight.grad is not None


def test_a_cut_inside_a_residual_block_is_refused():
    with pytest.raises(ConfigError, match=r"cut 'block3.conv1': besides its output, .* cross"):
        cut_model(_model(), "block3.conv1", input_shape=(64,))


def test_unknown_and_last_cuts_name_the_candidates():
    with pytest.raises(ConfigError, match=r"unknown cut 'nope'.*stem, layers.0, layers.1, block3"):
        cut_model(_model(), "nope", input_shape=(64,))
    with pytest.raises(ConfigError, match="nothing for the server"):
        cut_model(_model(), "head", input_shape=(64,))


def test_shape_branch_needs_a_shape_and_value_branch_is_refused():
    with pytest.raises(ConfigError, match="input shape is unknown"):
        cut_model(TinyResNet(), "stem")

    class ValueBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:
                x = -x
            return self.b(self.a(x))

    with pytest.raises(ConfigError, match="branches on input values"):
        cut_model(ValueBranch(), "a", input_shape=(4,))


def test_check_chain_accepts_traceable_models_and_records_the_shape():
    model = TinyResNet()
    check_chain(model, torch.randn(2, 64))
    client, server = cut_model(model, "block3")   # shape remembered from the check
    x = torch.randn(3, 64)
    model.eval()
    torch.testing.assert_close(server(client(x)), model(x))


def test_check_chain_refuses_a_forward_the_trace_does_not_reproduce():
    class ReadsTraining(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return nn.functional.dropout(self.a(x), 0.5, training=self.training)

    with pytest.raises(ConfigError, match="does not reproduce"):
        check_chain(ReadsTraining().train(), torch.randn(8, 4))


def test_ushape_on_a_custom_forward():
    model = _model()
    bottom, middle, head = cut_ushape(model, "stem", "block3", input_shape=(64,))
    x = torch.randn(3, 64)
    torch.testing.assert_close(head(middle(bottom(x))), model(x), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="forward order"):
        cut_ushape(model, "block3", "stem", input_shape=(64,))


def test_valid_cuts_of_a_custom_model():
    assert valid_cuts(_model(), (64,)) == ["stem", "layers.0", "layers.1", "block3"]


def test_a_chain_of_children_stays_sequential():
    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(4, 8)
            self.relu = nn.ReLU()
            self.fc2 = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc2(self.relu(self.fc1(x)))

    client, server = cut_model(Chain(), "relu", input_shape=(4,))
    assert isinstance(client, nn.Sequential) and list(client._modules) == ["fc1", "relu"]
    assert isinstance(server, nn.Sequential) and list(server._modules) == ["fc2"]
