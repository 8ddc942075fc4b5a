"""A server refuses a client bundle exported from another training run (issue: identity)."""

from __future__ import annotations

import torch

from edgesplit.train.server import SplitServer
from edgesplit.wire.messages import Kind, Message


def _hello(run_id: str | None) -> Message:
    meta = {"config": "vanilla", "mode": "infer"} | ({"run_id": run_id} if run_id else {})
    return Message(Kind.HELLO, "s1", "ward-3", 0, meta=meta)


def test_hello_from_another_run_is_refused_in_one_sentence() -> None:
    server = SplitServer("vanilla", torch.nn.Sequential(torch.nn.Linear(4, 2)), run_id="aaaa")
    refused = server.handle(_hello("bbbb"))
    assert refused.kind == Kind.ERROR
    text = refused.meta["message"]
    assert "run bbbb" in text and "run aaaa" in text and "\n" not in text
    welcome = server.handle(_hello("aaaa"))
    assert welcome.kind == Kind.WELCOME and welcome.meta["run_id"] == "aaaa"
    # bundles from before run ids existed, and servers without one, still talk
    assert server.handle(_hello(None)).kind == Kind.WELCOME
    anonymous = SplitServer("vanilla", torch.nn.Sequential(torch.nn.Linear(4, 2)))
    assert anonymous.handle(_hello("bbbb")).kind == Kind.WELCOME
