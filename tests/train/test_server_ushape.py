"""Two U-shaped sessions whose FORWARD and MIDDLE_GRAD interleave both train (issue 9,
defect 8): each pending forward runs on its own snapshot of the weights, so one session's step
does not invalidate the other's graph ("modified by an inplace operation")."""

from __future__ import annotations

import copy

import numpy as np
import torch

from edgesplit.train.server import SplitServer
from edgesplit.wire.frame import decode_frame, encode_frame
from edgesplit.wire.messages import Kind, Message


def _frame(seed: int, shape: tuple[int, ...]) -> bytes:
    return encode_frame(np.random.default_rng(seed).normal(size=shape).astype(np.float32), "fp32")


def test_interleaved_ushape_sessions_both_train_with_their_own_weights():
    torch.manual_seed(0)
    middle = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh())
    initial = copy.deepcopy(middle)
    server = SplitServer("ushape", middle, lr=0.1)
    acts = {"A": _frame(1, (4, 8)), "B": _frame(2, (4, 8))}
    grads = {"A": _frame(3, (4, 6)), "B": _frame(4, (4, 6))}
    for who in ("A", "B"):  # both forwards first: both run on the initial weights
        reply = server.handle(Message(Kind.FORWARD, who, who, 1, {"act": acts[who]}))
        assert reply.kind == Kind.MIDDLE
    replies = {
        who: server.handle(Message(Kind.MIDDLE_GRAD, who, who, 1, {"grad": grads[who]}))
        for who in ("A", "B")
    }
    assert all(r.kind == Kind.GRADIENT for r in replies.values()), replies
    assert server.steps_applied == 2
    # B's cut gradient is the one of the weights its forward ran on (one step stale, as in
    # asynchronous SGD), not of the weights A's step left
    act = torch.from_numpy(decode_frame(acts["B"]).copy()).requires_grad_(True)
    initial(act).backward(torch.from_numpy(decode_frame(grads["B"]).copy()))
    got = decode_frame(replies["B"].tensors["grad"])
    np.testing.assert_allclose(got, act.grad.numpy(), rtol=1e-6, atol=1e-7)
    # and both steps reached the weights
    assert not torch.equal(middle[0].weight, initial[0].weight)


def test_a_middle_grad_of_the_wrong_shape_keeps_the_forward_pending():
    torch.manual_seed(0)
    server = SplitServer("ushape", torch.nn.Sequential(torch.nn.Linear(8, 6)))
    assert server.handle(Message(Kind.FORWARD, "s", "c", 1, {"act": _frame(1, (4, 8))})).kind == (
        Kind.MIDDLE
    )
    bad = server.handle(Message(Kind.MIDDLE_GRAD, "s", "c", 1, {"grad": _frame(2, (4, 5))}))
    assert bad.kind == Kind.ERROR and "(4, 5)" in bad.meta["message"]
    good = server.handle(Message(Kind.MIDDLE_GRAD, "s", "c", 1, {"grad": _frame(2, (4, 6))}))
    assert good.kind == Kind.GRADIENT and server.steps_applied == 1
