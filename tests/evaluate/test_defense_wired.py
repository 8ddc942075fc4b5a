"""The privacy defenses act through the real training engine, not only in their unit tests:
``TrainSpec(defense=...)`` changes what crosses the wire (gradnoise), what the client segment
is (noise) and what the client optimises (nopeek)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from edgesplit.split.defense import LAYER_NAME, ClipNoise, parse_defense
from edgesplit.train.engine import TrainedSplit, run_training
from edgesplit.train.spec import TrainSpec
from edgesplit.transport.inprocess import InProcessTransport
from edgesplit.wire.frame import decode_frame
from edgesplit.wire.messages import Kind, Message

SEED = 0


@dataclass
class SpyTransport(InProcessTransport):
    """The in-process transport, keeping every training cut gradient as the client decodes it."""

    grads: list[np.ndarray] = field(default_factory=list)

    def request(self, message: Message) -> Message:
        reply = super().request(message)
        if message.kind == Kind.FORWARD and reply.kind == Kind.GRADIENT and "grad" in reply.tensors:
            self.grads.append(np.asarray(decode_frame(reply.tensors["grad"]), dtype=np.float32))
        return reply


def _train(defense: str | None) -> tuple[TrainedSplit, list[np.ndarray]]:
    spies: list[SpyTransport] = []

    def factory(handler, _name):
        spies.append(SpyTransport(handler))
        return spies[-1]

    spec = TrainSpec(data="digits", cut="relu1", epochs=2, seed=SEED, defense=defense)
    trained = run_training(spec, transport_factory=factory)
    assert len(spies) == 1 and spies[0].grads, "the spy saw no cut gradients"
    return trained, spies[0].grads


@pytest.fixture(scope="module")
def undefended() -> tuple[TrainedSplit, list[np.ndarray]]:
    return _train(None)


def _norm_spread(grads: list[np.ndarray]) -> float:
    """Mean over batches of std/mean of the per-sample gradient norms."""
    spreads = []
    for g in grads:
        norms = np.linalg.norm(g.reshape(len(g), -1), axis=1)
        spreads.append(norms.std() / norms.mean())
    return float(np.mean(spreads))


def test_gradnoise_changes_the_gradients_the_client_receives(undefended) -> None:
    _, plain = undefended
    trained, noised = _train("gradnoise:8")
    assert len(noised) == len(plain)
    assert not np.allclose(noised[0], plain[0], atol=1e-3)
    # step 1 starts from the same weights and batch, so the server's true gradient is the
    # undefended run's: what arrived must be exactly the defense applied to it
    expected = parse_defense("gradnoise:8", seed=SEED).server_grad(torch.from_numpy(plain[0]))
    np.testing.assert_allclose(noised[0], expected.numpy(), rtol=1e-5, atol=1e-7)
    # per-sample norms equalised (then noised): their spread within a batch collapses
    plain_spread, noised_spread = _norm_spread(plain), _norm_spread(noised)
    assert plain_spread > 0.5, plain_spread
    assert noised_spread < 0.15, noised_spread
    assert np.isfinite(trained.result.accuracy) and not trained.result.diverged


def test_noise_ends_the_client_segment_and_clips_in_eval(undefended) -> None:
    trained, _ = _train("noise:2:4")
    lower = trained.client_segments[0]
    # the last module the segment runs (whatever wraps it, e.g. an input standardization first)
    name, layer = list(lower.named_modules())[-1]
    assert name.split(".")[-1] == LAYER_NAME, name
    assert isinstance(layer, ClipNoise) and (layer.sigma, layer.clip) == (2.0, 4.0)
    seen: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0]))
    x = torch.from_numpy(trained.dataset.x_test[:200])
    lower.eval()
    with torch.no_grad():
        out = lower(x)
        again = lower(x)
    hook.remove()
    raw = seen[0]  # what the segment computes before the defense layer
    norms = out.reshape(len(out), -1).norm(dim=1)
    assert float(norms.max()) <= 4.0 + 1e-4
    assert torch.equal(out, again)  # eval: clip only, deterministic (ONNX parity)
    assert float(raw.reshape(len(raw), -1).norm(dim=1).max()) > 4.0  # the clip did bind
    lower.train()
    with torch.no_grad():
        assert not torch.allclose(lower(x), out)  # training: noise on top of the clip
    # the defended run's client is not the undefended one's
    plain_first = next(iter(undefended[0].client_segments[0].parameters()))
    assert not torch.allclose(next(iter(lower.parameters())), plain_first)


def test_nopeek_trains_a_different_client(undefended) -> None:
    trained, _ = _train("nopeek:3")
    assert np.isfinite(trained.result.accuracy) and not trained.result.diverged
    assert trained.result.accuracy > 0.5
    plain = undefended[0].client_segments[0].state_dict()
    peeked = trained.client_segments[0].state_dict()
    assert plain.keys() == peeked.keys()
    # the same seed and batches: only NoPeek's extra loss term can move the client elsewhere
    assert any(not torch.allclose(plain[k], peeked[k], atol=1e-4) for k in plain)
