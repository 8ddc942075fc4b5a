"""SplitFed with a fixed seed gives the same weights however its clients' requests interleave
(issue 9, defect 9): the server applies a round's steps in a fixed order (batch position, then
client index) and sums FedAvg contributions in index order."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch

from edgesplit.train.server import SplitServer
from edgesplit.wire.frame import decode_frame, encode_frame
from edgesplit.wire.messages import Kind, Message

CLIENTS, ROUNDS = 3, 2


def _batches(i: int) -> int:
    return 3 + (i == 0)  # plans of different lengths, as IID shards of uneven size give


def _run(jitter: int, start_order: list[int]) -> tuple[list[np.ndarray], list[dict[str, bytes]]]:
    torch.manual_seed(0)
    spec = {"config": "splitfed", "clients": CLIENTS, "epochs": ROUNDS}
    server = SplitServer(
        "splitfed", torch.nn.Sequential(torch.nn.Linear(8, 3)), spec=spec, wait_timeout=60
    )
    averages: list[dict[str, bytes]] = [{} for _ in range(CLIENTS)]
    errors: list[Message] = []

    def client(i: int) -> None:
        rng = random.Random(jitter * 100 + i)
        name, session = f"c{i}", f"s{i}"
        hello = Message(Kind.HELLO, session, name, 0, meta={"mode": "train", "index": i})
        assert server.handle(hello).kind == Kind.WELCOME
        step = 0
        for rnd in range(ROUNDS):
            for b in range(_batches(i)):
                threading.Event().wait(rng.random() * 0.003)  # scramble the arrival order
                data = np.random.default_rng([rnd, b, i])
                act = data.normal(size=(4, 8)).astype(np.float32)
                labels = data.integers(0, 3, size=4).astype(np.uint8)
                step += 1
                tensors = {"act": encode_frame(act, "fp32"), "labels": encode_frame(labels, "fp32")}
                reply = server.handle(Message(Kind.FORWARD, session, name, step, tensors))
                if reply.kind != Kind.GRADIENT:
                    errors.append(reply)
                    return
            step += 1
            weights = {"w": encode_frame(np.full(5, 0.1 * (i + 1), dtype=np.float32), "fp32")}
            meta = {"mode": "average", "round": rnd, "index": i, "clients": CLIENTS}
            meta["n_samples"] = 4 * _batches(i)
            reply = server.handle(Message(Kind.WEIGHTS, session, name, step, weights, meta))
            if reply.kind != Kind.WEIGHTS:
                errors.append(reply)
                return
            averages[i] = reply.tensors

    threads = [threading.Thread(target=client, args=(i,)) for i in start_order]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0].meta
    assert server.steps_applied == ROUNDS * sum(_batches(i) for i in range(CLIENTS))
    return [p.detach().numpy().copy() for p in server.segment.parameters()], averages


@pytest.mark.parametrize("jitter", [1, 2])
def test_splitfed_weights_do_not_depend_on_arrival_order(jitter):
    reference, ref_avg = _run(0, [0, 1, 2])
    weights, averages = _run(jitter, [2, 0, 1])
    for a, b in zip(reference, weights, strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(a == ref_avg[0] for a in averages + ref_avg)
    np.testing.assert_allclose(
        decode_frame(averages[0]["w"]), np.full(5, (0.1 * 4 + 0.2 * 3 + 0.3 * 3) / 10), rtol=1e-6
    )
