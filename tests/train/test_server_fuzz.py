"""A quick in-process fuzz of the server core for every configuration: hostile kinds, steps,
meta values and frames never raise out of ``handle`` and never get ``INTERNAL`` (which now means
a server fault, not a peer's mistake). The long fuzz over gRPC is ``scripts/fuzz_server.py``."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch

from edgesplit.train.server import SplitServer
from edgesplit.wire.frame import encode_frame
from edgesplit.wire.messages import Kind, Message

KINDS = [Kind.HELLO, Kind.FORWARD, Kind.PREDICT, Kind.MIDDLE_GRAD, Kind.WEIGHTS, Kind.BYE, "x"]
VALUES = [
    0,
    1,
    2,
    -1,
    3.5,
    float("inf"),
    float("nan"),
    1e400,
    10**30,
    True,
    None,
    "",
    "a" * 300,
    [],
    {},
    "train",
    "infer",
    "put",
    "get",
    "average",
    "vanilla",
    "ushape",
    "q8",
    "q9",
]
NAMES = [
    "mode",
    "config",
    "codec",
    "turn",
    "round",
    "index",
    "clients",
    "n_samples",
    "party",
    "parties",
    "group",
    "ids",
    "want_grad",
    "run_id",
]


def _frames(rng: np.random.Generator) -> list[bytes]:
    good = rng.normal(size=(4, 8)).astype(np.float32)
    return [
        encode_frame(good, "q8"),
        encode_frame(good, "fp32"),
        encode_frame(rng.normal(size=(4, 9)).astype(np.float32), "fp32"),
        encode_frame(rng.normal(size=(4, 6)).astype(np.float32), "fp32"),
        encode_frame(np.array([0, 1, 2, 1], dtype=np.uint8), "fp32"),
        encode_frame(np.array([0, -100, 2, 1], dtype=np.int16), "fp32"),
        encode_frame(np.array([3e38, 0, 0, 0], dtype=np.float32), "fp32"),
        encode_frame(np.zeros((0, 8), dtype=np.float32), "fp32"),
        encode_frame(np.zeros(3, dtype=np.float32), "fp32"),
        b"ESF\x02garbage",
        b"",
    ]


@pytest.mark.parametrize("config", ["vanilla", "splitfed", "ushape", "vertical"])
def test_hostile_requests_are_refusals_never_server_faults(config, caplog):
    torch.manual_seed(0)
    out = 6 if config == "ushape" else 3
    spec = {"clients": 1, "epochs": 1, "shapes": {"num_classes": 3}}
    server = SplitServer(
        config, torch.nn.Sequential(torch.nn.Linear(8, out)), wait_timeout=0.02, spec=spec
    )
    rng = np.random.default_rng(0)
    pick = random.Random(0)
    frames = _frames(rng)
    codes: set[str] = set()
    kinds: set[str] = set()
    step = 0
    with caplog.at_level(logging.CRITICAL, logger="edgesplit.train.server"):
        for _ in range(1500):
            step += 1
            if pick.random() < 0.5:  # a valid step with one thing changed
                message = _valid(config, frames, step)
                if pick.random() < 0.5:
                    message.meta[pick.choice(NAMES)] = pick.choice(VALUES)
                else:
                    message.tensors[pick.choice(list(message.tensors))] = pick.choice(frames)
            else:  # anything
                names = pick.sample(["act", "labels", "grad", "act_ref", "w", "emodel"], k=3)
                tensors = {n: pick.choice(frames) for n in names[: pick.randint(0, 3)]}
                meta = {n: pick.choice(VALUES) for n in pick.sample(NAMES, k=pick.randint(0, 5))}
                message = Message(
                    pick.choice(KINDS),
                    pick.choice(["s1", "s2"]),
                    pick.choice(["alice", "bob", ""]),
                    pick.choice([step, 0, step - 3]),
                    tensors,
                    meta,
                )
            reply = server.handle(message)
            kinds.add(reply.kind)
            if reply.kind == Kind.ERROR:
                codes.add(reply.meta["code"])
                assert reply.meta["code"] != "INTERNAL", (message.kind, meta, reply.meta)
    assert "INVALID_ARGUMENT" in codes
    assert kinds & {Kind.GRADIENT, Kind.MIDDLE}, kinds  # valid steps went through as well


def _valid(config: str, frames: list[bytes], step: int) -> Message:
    """A step the server accepts (a one-party vertical run needs no partner)."""
    tensors = {"act": frames[0]}
    if config != "ushape":
        tensors["labels"] = frames[4]
    meta = {"party": 0, "parties": 1} if config == "vertical" else {}
    return Message(Kind.FORWARD, "s1", "alice", step, tensors, meta)
