"""Rate-aware training: the learned bottleneck, entropy models as side information, wire byte
counts against the fp32 reference, and what a malicious client can do with entropy models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgesplit.codecs.entropy import EntropyModel, code_counts
from edgesplit.codecs.fixed import quantize_codes
from edgesplit.errors import ConfigError
from edgesplit.split.bottleneck import BottleneckSpec, default_codecs
from edgesplit.train.engine import run_training
from edgesplit.train.server import SplitServer
from edgesplit.train.spec import TrainSpec
from edgesplit.transport.inprocess import InProcessTransport
from edgesplit.wire.frame import encode_frame, read_header
from edgesplit.wire.messages import Kind, Message


def test_bottleneck_spec_parsing() -> None:
    assert BottleneckSpec.parse("16") == BottleneckSpec(16, 2, 0.01)
    assert BottleneckSpec.parse("8:1:0") == BottleneckSpec(8, 1, 0.0)
    assert default_codecs("16:2") == ("fq:2,ans", "q4:stochastic")
    assert default_codecs(None) == ("fp32", "fp32")
    for bad in ("0", "16:9", "x:2", "16:two", "16:2:-1", "16:2:0.1:3"):
        with pytest.raises(ConfigError, match="bottleneck"):
            BottleneckSpec.parse(bad)


@pytest.fixture(scope="module")
def runs() -> dict[str, object]:
    spec = dict(data="digits", epochs=3, seed=0)
    seen: list[Message] = []

    def spying(handler, name):  # noqa: ANN001, ARG001 - the engine's transport factory
        def spy(message: Message) -> Message:
            seen.append(message)
            return handler(message)

        return InProcessTransport(spy)

    neck = run_training(
        TrainSpec(**spec, bottleneck="16:2", codec="fq:2,ans", grad_codec="q4:stochastic"),
        transport_factory=spying,
    )
    plain = run_training(TrainSpec(**spec))
    return {"neck": neck, "plain": plain, "seen": seen}


def test_encoder_ships_with_the_client_and_decoder_with_the_server(runs) -> None:
    neck = runs["neck"]
    lower, server = neck.client_segments[0], neck.server_segment
    assert lower.bottleneck.project.out_features == 16
    assert server.unbottleneck.project.in_features == 16
    x = torch.from_numpy(neck.dataset.x_test[:5])
    with torch.no_grad():
        cut = lower.eval()(x).numpy()
    assert cut.shape == (5, 16)
    levels = np.unique(np.round(cut * 3, 5))
    assert set(levels) <= {0.0, 1.0, 2.0, 3.0}  # on the fixed grid: nothing per batch needed


def test_entropy_model_is_fitted_sent_once_and_used(runs) -> None:
    seen = runs["seen"]
    carrying = [m for m in seen if "emodel" in m.tensors]
    # one model per epoch end (3), each sent once with the next frame that uses it
    assert len(carrying) == 3
    forwards = [m for m in seen if m.kind == Kind.FORWARD]
    first, last = read_header(forwards[0].tensors["act"]), read_header(forwards[-1].tensors["act"])
    assert first.codec == "fq:2"  # before any model: packed
    assert last.codec.startswith("fq:2,model=")
    assert last.payload_length < first.payload_length  # entropy coding pays off
    # the model fitted after the last epoch is what the test predictions (and a bundle) use
    predicts = [m for m in seen if m.kind == Kind.PREDICT]
    codec = runs["neck"].meta["codecs"][0]
    assert codec == read_header(predicts[-1].tensors["act"]).codec
    assert codec.split("=")[1] in runs["neck"].meta["entropy_models"]


def test_ratios_are_against_the_cut_without_bottleneck(runs) -> None:
    neck, plain = runs["neck"].result, runs["plain"].result
    # the fp32 reference of the bottleneck run is the plain run's traffic, envelope included
    # (it differs only by the entropy models the bottleneck run sent as side information)
    assert plain.bytes_up == plain.bytes_up_fp32
    assert neck.bytes_up_fp32 == pytest.approx(plain.bytes_up, rel=0.002)
    assert neck.ratio_up == pytest.approx(neck.bytes_up_fp32 / neck.bytes_up)
    assert neck.ratio_up > 50 and neck.ratio_down > 20
    per_client = neck.clients[0]
    assert 0 < per_client.envelope_up < neck.bytes_up / 2  # counted, and not the bulk


def _server() -> SplitServer:
    torch.manual_seed(0)
    return SplitServer("vanilla", torch.nn.Sequential(torch.nn.Linear(8, 3)), codec="fq:2,ans")


def _forward(client: str, step: int, tensors: dict[str, bytes]) -> Message:
    labels = encode_frame(np.array([0, 1, 2, 1], dtype=np.uint8), "fp32", int_bits=2)
    return Message(Kind.FORWARD, "s-" + client, client, step, {**tensors, "labels": labels})


def _model_frame(x: np.ndarray) -> tuple[int, bytes]:
    model = EntropyModel.fit(code_counts(quantize_codes(x, 2), 4))
    return model.model_id, encode_frame(model.freqs, "fp32")


def test_a_client_cannot_use_or_replace_another_clients_model() -> None:
    from edgesplit.codecs.entropy import ModelTable, use_models

    server = _server()
    x = np.random.default_rng(0).random((4, 8), dtype=np.float32)
    model_id, model_frame = _model_frame(x)
    table = ModelTable()
    table.add(EntropyModel.fit(code_counts(quantize_codes(x, 2), 4)))
    with use_models(table):
        act = encode_frame(x, f"fq:2,model={model_id:08x}")
    ok = server.handle(_forward("alice", 1, {"act": act, "emodel": model_frame}))
    assert ok.kind == Kind.GRADIENT
    # bob references alice's model without sending it: refused, alice unaffected
    stolen = server.handle(_forward("bob", 1, {"act": act}))
    assert stolen.kind == Kind.ERROR and "does not have" in stolen.meta["message"]
    again = server.handle(_forward("alice", 2, {"act": act}))
    assert again.kind == Kind.GRADIENT


def test_model_flood_and_bad_models_stay_bounded_and_refused() -> None:
    server = _server()
    rng = np.random.default_rng(1)
    for step in range(1, 41):  # a token holder sending a new model with every step
        x = rng.random((4, 8), dtype=np.float32) ** rng.uniform(0.2, 5)
        _, frame = _model_frame(x)
        act = encode_frame(x, "fq:2")
        assert server.handle(_forward("mallory", step, {"act": act, "emodel": frame})).kind == (
            Kind.GRADIENT
        )
    assert len(server._models["mallory"].models) <= 4  # bounded per client
    act = encode_frame(rng.random((4, 8), dtype=np.float32), "fq:2")
    bad_tables = [
        np.zeros((8, 4), np.uint16),  # a zero frequency: an impossible code
        np.ones((8, 3), np.uint16),  # not 2**bits codes
        np.ones((8, 4), np.float32),  # not frequencies
        np.ones((1 << 15, 4), np.uint16),  # more channels than any cut
    ]
    for i, table in enumerate(bad_tables, start=100):
        frame = encode_frame(table, "fp32")
        reply = server.handle(_forward("mallory", i, {"act": act, "emodel": frame}))
        assert reply.kind == Kind.ERROR and reply.meta["code"] == "INVALID_ARGUMENT", table.shape
    good = server.handle(_forward("mallory", 200, {"act": act}))
    assert good.kind == Kind.GRADIENT  # the server kept serving


def test_rate_penalty_lowers_the_code_entropy_estimate_after_warm_up() -> None:
    from edgesplit.split.bottleneck import (
        RATE_WARMUP_STEPS,
        FixedRangeQuantizer,
        rate_loss,
        soft_entropy,
    )

    # a spread of values has a high entropy estimate, values near one level a low one
    spread = torch.linspace(0, 1, 400).reshape(100, 4)
    assert soft_entropy(spread, 2) > 1.5 > 0.2 > soft_entropy(torch.full((100, 4), 0.98), 2)
    q = FixedRangeQuantizer(2, rate=0.5)
    module = torch.nn.Sequential(q)
    x = torch.rand(32, 4, requires_grad=True)
    for _ in range(RATE_WARMUP_STEPS):
        module(x)
        assert rate_loss(module) is None  # warm-up: features first
    module(x)
    penalty = rate_loss(module)
    assert penalty is not None and penalty.item() > 0
    penalty.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # it reaches the encoder
    module.eval()
    module(x)
    assert rate_loss(module) is None  # never at inference


def test_a_bottleneck_goes_after_the_feature_extractor_by_default() -> None:
    from edgesplit.train.engine import resolve_cuts
    from edgesplit.train.spec import TrainSpec

    image = (1, 8, 8)
    assert resolve_cuts(TrainSpec(data="digits_images"), image) == ("pool1",)
    assert resolve_cuts(TrainSpec(data="digits_images", bottleneck="16:2"), image) == ("flatten",)
    assert resolve_cuts(TrainSpec(bottleneck="16:2"), (64,)) == ("relu1",)
    # a cut the user names wins
    assert resolve_cuts(TrainSpec(cut="relu2", bottleneck="16:2"), image) == ("relu2",)


def test_a_seeded_run_with_stochastic_gradients_is_reproducible() -> None:
    from edgesplit.train.engine import run_training
    from edgesplit.train.spec import TrainSpec

    spec = TrainSpec(data="digits", epochs=2, bottleneck="8:2", seed=3)
    assert spec.bottleneck and "stochastic" in BottleneckSpec.parse(spec.bottleneck).grad_codec
    first, second = run_training(spec), run_training(spec)
    assert first.result.accuracy == second.result.accuracy
    assert first.result.bytes_up == second.result.bytes_up
    for a, b in zip(
        first.server_segment.state_dict().values(),
        second.server_segment.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b)
