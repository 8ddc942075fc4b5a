"""The adaptive bitrate controller: probes over budget move a client to more bits, a run of
cheap probes to fewer bytes; the server tells the client and logs why."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgesplit.errors import CodecError, ConfigError
from edgesplit.train.controller import BitrateController
from edgesplit.train.server import SplitServer
from edgesplit.wire.frame import encode_frame
from edgesplit.wire.messages import Kind, Message

LADDER = ("q1+zstd", "q4+zstd", "q8+zstd")


def probe(drop_points: float) -> dict[str, float]:
    return {"accuracy_reference": 0.9, "accuracy_decoded": 0.9 - drop_points / 100}


def test_over_budget_moves_up_at_once_and_calm_moves_down_after_patience() -> None:
    c = BitrateController(LADDER, max_drop=0.5, patience=3, start=0)
    assert c.codec_for("a") == "q1+zstd"
    switch = c.observe("a", probe(3.0))
    assert switch and switch["to"] == "q4+zstd" and "over the budget" in switch["why"]
    assert c.codec_for("a") == "q4+zstd" and c.codec_for("b") == "q1+zstd"  # per client
    assert c.observe("a", probe(0.0)) is None
    assert c.observe("a", probe(0.1)) is None
    down = c.observe("a", probe(0.0))
    assert down and down["to"] == "q1+zstd" and "fewer bytes" in down["why"]


def test_the_top_and_bottom_rungs_hold() -> None:
    c = BitrateController(LADDER, max_drop=0.5)
    assert c.codec_for("a") == "q8+zstd"  # a new client starts safe
    assert c.observe("a", probe(10.0)) is None  # nothing finer to move to
    c2 = BitrateController(LADDER, max_drop=0.5, patience=1, start=0)
    assert all(c2.observe("a", probe(0.0)) is None for _ in range(5))


def test_bad_ladders_are_refused() -> None:
    with pytest.raises(CodecError):
        BitrateController.parse("q4+zstd,q5", 0.5)
    with pytest.raises(ConfigError):
        BitrateController(("q4",), max_drop=0)
    with pytest.raises(ConfigError):
        BitrateController((), max_drop=1)


def test_server_moves_a_lossy_client_up_and_says_so_in_the_reply_and_the_log() -> None:
    torch.manual_seed(0)
    upper = torch.nn.Sequential(torch.nn.Linear(16, 4))
    controller = BitrateController(LADDER, max_drop=0.5, start=0)
    server = SplitServer("vanilla", upper, controller=controller)
    logged: list[dict] = []
    server.on_probe = logged.append
    hello = server.handle(Message(Kind.HELLO, "s", "dev", 0, meta={"mode": "train"}))
    assert hello.meta["codec"] == "q1+zstd"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 16)).astype(np.float32)
    labels = np.argmax(upper(torch.from_numpy(x)).detach().numpy(), 1).astype(np.uint8)
    msg = Message(
        Kind.FORWARD, "s", "dev", 1,
        {"act": encode_frame(x, "q1+zstd"), "act_ref": encode_frame(x, "fp32"),
         "labels": encode_frame(labels, "fp32")},
        {"want_grad": False},
    )
    reply = server.handle(msg)
    assert reply.kind == Kind.GRADIENT
    assert reply.meta["codec"] == "q4+zstd"  # 1 bit lost accuracy: the client gets more bits
    assert logged and logged[-1]["switch"]["to"] == "q4+zstd"
    assert server.handle(Message(Kind.HELLO, "s", "dev", 2)).meta["codec"] == "q4+zstd"
