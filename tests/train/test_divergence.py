"""A run that diverges is a result, not a crash: nothing non-finite is applied, the run stops,
and the result says so."""

from __future__ import annotations

import numpy as np
import torch

from edgesplit.train.engine import run_training
from edgesplit.train.server import SplitServer
from edgesplit.train.spec import TrainSpec
from edgesplit.wire.frame import encode_frame
from edgesplit.wire.messages import Kind, Message


def test_non_finite_step_is_refused_and_not_applied():
    torch.manual_seed(0)
    upper = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with torch.no_grad():
        upper[0].weight[0, 0] = float("inf")  # logits become inf/nan
    before = upper[0].bias.detach().clone()
    server = SplitServer("vanilla", upper)
    act = encode_frame(np.ones((2, 4), dtype=np.float32), "fp32")
    labels = encode_frame(np.array([0, 1], dtype=np.uint8), "fp32")
    reply = server.handle(Message(Kind.FORWARD, "s", "c", 1, {"act": act, "labels": labels}))
    assert reply.kind == Kind.ERROR and reply.meta["diverged"] is True
    assert "diverged" in reply.meta["message"] and server.steps_applied == 0
    torch.testing.assert_close(upper[0].bias, before)


def test_diverging_run_reports_instead_of_crashing():
    result = run_training(TrainSpec(epochs=3, lr=50.0, codec="q8+zstd")).result
    assert result.diverged is True
    assert len(result.history) < 3
    assert 0.0 <= result.accuracy <= 1.0
