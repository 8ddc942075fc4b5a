"""Each defense piece on its own: parsing, the clip+noise layer (and its ONNX export), NoPeek's
dCor loss and the server's gradient perturbation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from edgesplit.errors import ConfigError
from edgesplit.evaluate import privacy
from edgesplit.split.defense import LAYER_NAME, ClipNoise, distance_correlation, parse_defense


def test_none_does_nothing() -> None:
    for spec in (None, "", "none"):
        d = parse_defense(spec)
        assert not d.active
        lower = nn.Sequential(nn.Linear(4, 3))
        assert d.wrap_lower(lower) is lower
        assert d.client_loss(torch.zeros(4, 4), torch.zeros(4, 3)) is None
        g = torch.randn(5, 3)
        assert d.server_grad(g, torch.zeros(5)) is g


def test_parse_pieces_and_errors() -> None:
    d = parse_defense("noise:0.5:2+nopeek:3+gradnoise:4")
    assert (d.noise_sigma, d.noise_clip, d.nopeek_alpha, d.grad_sigma) == (0.5, 2.0, 3.0, 4.0)
    assert d.active and d.spec == "noise:0.5:2+nopeek:3+gradnoise:4"
    with pytest.raises(ConfigError, match="unknown defense 'dp'.*noise:SIGMA.*nopeek:ALPHA"):
        parse_defense("dp:1")
    with pytest.raises(ConfigError, match="needs a number"):
        parse_defense("noise:abc")
    with pytest.raises(ConfigError, match=">= 0"):
        parse_defense("nopeek:-1")
    with pytest.raises(ConfigError, match="twice"):
        parse_defense("nopeek:1+nopeek:2")
    with pytest.raises(ConfigError, match="takes"):
        parse_defense("gradnoise")
    with pytest.raises(ConfigError, match="clip must be > 0"):
        parse_defense("noise:1:0")


def test_clip_noise_clips_and_adds_noise_only_when_training() -> None:
    torch.manual_seed(0)
    layer = ClipNoise(sigma=0.5, clip=1.0)
    x = torch.randn(256, 128) * 10
    layer.eval()
    y = layer(x)
    assert torch.allclose(y.norm(dim=1), torch.ones(256), atol=1e-5)   # clipped to norm 1
    small = torch.full((2, 128), 0.01)
    assert torch.allclose(layer(small), small)                           # under the clip: kept
    layer.train()
    noisy = layer(x)
    noise_norm = (noisy - y).norm(dim=1).mean().item()
    assert noise_norm == pytest.approx(0.5, rel=0.1)                     # sigma * clip


def test_wrap_lower_appends_the_layer_and_keeps_names() -> None:
    lower = nn.Sequential()
    lower.add_module("fc1", nn.Linear(8, 4))
    lower.add_module("relu1", nn.ReLU())
    wrapped = parse_defense("noise:0.3").wrap_lower(lower)
    assert [n for n, _ in wrapped.named_children()] == ["fc1", "relu1", LAYER_NAME]
    assert wrapped.fc1 is lower.fc1   # same parameters: training the wrap trains the segment


def test_clip_layer_exports_to_onnx_as_the_clip(tmp_path: object) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from pathlib import Path

    lower = parse_defense("noise:1.0:0.5").wrap_lower(nn.Sequential(nn.Linear(6, 5), nn.ReLU()))
    lower.eval()
    path = Path(str(tmp_path)) / "client.onnx"
    x = torch.randn(3, 6) * 5
    torch.onnx.export(lower, (x,), str(path), input_names=["x"], output_names=["act"],
                      dynamic_axes={"x": {0: "batch"}, "act": {0: "batch"}}, dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)))
    got = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]
    want = lower(x).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.linalg.norm(got, axis=1) <= 0.5 + 1e-5)


def test_nopeek_loss_is_the_batch_dcor_and_differentiable() -> None:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((16, 6)))
    act = torch.from_numpy(rng.standard_normal((16, 4))).requires_grad_(True)
    loss = parse_defense("nopeek:2").client_loss(x, act)
    assert loss is not None
    want = privacy.dcor_biased(x.numpy(), act.detach().numpy())
    assert float(loss.detach()) == pytest.approx(2 * want, rel=1e-4)
    loss.backward()
    assert act.grad is not None and torch.isfinite(act.grad).all()
    assert float(distance_correlation(x, 2 * x + 1)) == pytest.approx(1.0, abs=1e-4)


def _leak(grads: torch.Tensor, labels: torch.Tensor) -> float:
    batches = [(grads[i:i + 32].numpy(), labels[i:i + 32].numpy())
               for i in range(0, len(labels), 32)]
    return privacy.label_leak([batches], 2).label_auc


def test_gradnoise_hides_a_planted_label_direction() -> None:
    torch.manual_seed(0)
    n, dim = 640, 64
    labels = torch.randint(0, 2, (n,))
    direction = torch.randn(dim)
    # binary cross-entropy-like cut gradients: sign by label, larger for positives
    grads = (2 * labels.float() - 1)[:, None] * direction * (1 + labels.float())[:, None]
    grads = grads + 0.05 * torch.randn(n, dim)
    assert _leak(grads, labels) > 0.99
    d = parse_defense("gradnoise:8", seed=1)
    out = torch.cat([d.server_grad(grads[i:i + 32], labels[i:i + 32])
                     for i in range(0, n, 32)])
    assert out.shape == grads.shape
    # norms are equalised within a batch (before noise the norm attack is perfect)
    eq = parse_defense("gradnoise:0").server_grad(grads[:32], labels[:32]).norm(dim=1)
    assert torch.allclose(eq, eq.mean().expand(32), rtol=1e-5)
    assert _leak(out, labels) < 0.65
    # the mean gradient survives (what training needs): noise averages out over a batch
    cos = torch.nn.functional.cosine_similarity(out.mean(0), grads.mean(0), dim=0)
    assert math.isfinite(float(cos))


def test_backward_adds_the_nopeek_gradient_to_the_server_gradient() -> None:
    torch.manual_seed(0)
    lower = nn.Sequential(nn.Linear(5, 4), nn.ReLU())
    x, grad = torch.randn(8, 5), torch.randn(8, 4)

    def param_grad(spec: str | None, with_extra: bool) -> torch.Tensor:
        lower.zero_grad()
        act = lower(x)
        if with_extra:   # the reference: one scalar objective whose gradient is the sum
            d = parse_defense(spec)
            extra = d.client_loss(x, act)
            assert extra is not None
            ((act * grad).sum() + extra).backward()
        else:
            parse_defense(spec).backward(x, act, grad)
        return lower[0].weight.grad.clone()

    plain = param_grad(None, False)
    lower.zero_grad()
    act = lower(x)
    act.backward(grad)
    assert torch.allclose(plain, lower[0].weight.grad)
    assert torch.allclose(param_grad("nopeek:2", False), param_grad("nopeek:2", True), atol=1e-6)
    assert not torch.allclose(param_grad("nopeek:2", False), plain)
