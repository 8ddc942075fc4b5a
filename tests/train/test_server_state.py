"""What a restarted server restores (``export_state``/``import_state``, as ``serve --state``
saves them): replay records, what each HELLO bound, the run's members and end, the splitfed
order and who holds each client index, the hand-off and its weight schema."""

from __future__ import annotations

import json

import numpy as np
import torch

from edgesplit.train.server import SplitServer
from edgesplit.wire.frame import encode_frame
from edgesplit.wire.messages import Kind, Message

LABELS = encode_frame(np.array([0, 1, 2, 1], dtype=np.uint8), "fp32")


def _server(config: str = "vanilla", **kwargs) -> SplitServer:
    torch.manual_seed(0)
    return SplitServer(config, torch.nn.Sequential(torch.nn.Linear(8, 3)), **kwargs)


def _act() -> bytes:
    return encode_frame(np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32), "q8")


def _restart(server: SplitServer, config: str = "vanilla", **kwargs) -> SplitServer:
    tensors, meta = server.export_state()
    meta = json.loads(json.dumps(meta))  # the state file holds JSON-able counters
    fresh = _server(config, **kwargs)
    fresh.import_state(tensors, meta)
    return fresh


def test_bindings_records_and_run_survive_a_restart():
    spec = {"config": "vanilla", "clients": 1, "epochs": 1}
    server = _server(spec=spec, require_hello=True)
    hello = Message(Kind.HELLO, "t", "alice", 0, meta={"mode": "train", "codec": "q8"})
    assert server.handle(hello).kind == Kind.WELCOME
    assert server.handle(Message(Kind.HELLO, "i", "alice", 0, meta={"mode": "infer"})).kind == (
        Kind.WELCOME
    )
    forward = Message(Kind.FORWARD, "t", "alice", 1, {"act": _act(), "labels": LABELS})
    first = server.handle(forward)
    weights = {"w": encode_frame(np.ones(3, dtype=np.float32), "fp32")}
    put = Message(Kind.WEIGHTS, "t", "alice", 2, weights, {"mode": "put"})
    assert server.handle(put).kind == Kind.ACK

    again = _restart(server, spec=spec, require_hello=True)
    assert again.steps_applied == 1 and again.handoffs == 1
    assert again.handle(forward).tensors == first.tensors  # answered from the record
    assert again.steps_applied == 1
    infer_train = Message(Kind.FORWARD, "i", "alice", 1, {"act": _act(), "labels": LABELS})
    refused = again.handle(infer_train)
    assert refused.kind == Kind.ERROR and "mode=infer" in refused.meta["message"]
    other_codec = Message(
        Kind.FORWARD,
        "t",
        "alice",
        3,
        {"act": encode_frame(np.zeros((4, 8), np.float32), "q4"), "labels": LABELS},
    )
    assert "announced 'q8'" in again.handle(other_codec).meta["message"]
    # the run's member is remembered: another client still cannot join
    bob = again.handle(Message(Kind.HELLO, "b", "bob", 0, meta={"mode": "train"}))
    assert bob.kind == Kind.ERROR and bob.meta["code"] == "FAILED_PRECONDITION"
    # and the hand-off's schema: weights of another shape are still refused
    wrong = {"w": encode_frame(np.ones(4, dtype=np.float32), "fp32")}
    bad_put = again.handle(Message(Kind.WEIGHTS, "t", "alice", 4, wrong, {"mode": "put"}))
    assert bad_put.kind == Kind.ERROR and "(4,)" in bad_put.meta["message"]


def test_splitfed_order_and_index_owners_survive_a_restart():
    spec = {"config": "splitfed", "clients": 2, "epochs": 3}
    server = _server("splitfed", spec=spec, wait_timeout=0.5)
    for i in range(2):
        hello = Message(Kind.HELLO, f"s{i}", f"c{i}", 0, meta={"mode": "train", "index": i})
        assert server.handle(hello).kind == Kind.WELCOME
    step0 = Message(Kind.FORWARD, "s0", "c0", 1, {"act": _act(), "labels": LABELS})
    assert server.handle(step0).kind == Kind.GRADIENT  # (0, 0, 0) goes first

    again = _restart(server, "splitfed", spec=spec, wait_timeout=0.5)
    # client 0's second step still waits for client 1's first: the order was restored
    early = again.handle(Message(Kind.FORWARD, "s0", "c0", 2, {"act": _act(), "labels": LABELS}))
    assert early.kind == Kind.ERROR and early.meta["code"] == "DEADLINE_EXCEEDED"
    step1 = Message(Kind.FORWARD, "s1", "c1", 1, {"act": _act(), "labels": LABELS})
    assert again.handle(step1).kind == Kind.GRADIENT
    hello = Message(Kind.HELLO, "x", "mallory", 0, meta={"mode": "infer", "index": 1})
    taken = again.handle(hello)
    assert taken.kind == Kind.ERROR and "belongs to client 'c1'" in taken.meta["message"]


def test_the_loss_report_covers_steps_from_before_a_restart():
    server = _server()
    for step in (1, 2):  # no report asked: the replies carry no loss
        forward = Message(Kind.FORWARD, "t", "alice", step, {"act": _act(), "labels": LABELS})
        reply = server.handle(forward)
        assert reply.kind == Kind.GRADIENT and "loss" not in reply.meta
    again = _restart(server)
    asked = Message(
        Kind.FORWARD, "t", "alice", 3, {"act": _act(), "labels": LABELS}, {"report": True}
    )
    report = again.handle(asked).meta
    assert report["n"] == 12  # the three batches of 4, two of them before the restart
    assert 0 <= report["correct"] <= 12 and report["loss"] > 0
    later = Message(Kind.FORWARD, "t", "alice", 4, {"act": _act(), "labels": LABELS})
    nothing = again.handle(later)
    assert "loss" not in nothing.meta  # reported totals start over
