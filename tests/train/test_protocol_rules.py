"""Protocol rules the server enforces: labels stay home in ushape, a repeated step is answered
from the record and never applied twice, bad frames become INVALID_ARGUMENT replies."""

from __future__ import annotations

import numpy as np
import torch

from edgesplit.train.engine import run_training
from edgesplit.train.server import SplitServer
from edgesplit.train.spec import TrainSpec
from edgesplit.transport.inprocess import InProcessTransport
from edgesplit.wire.frame import decode_frame, encode_frame
from edgesplit.wire.messages import Kind, Message


def test_ushape_server_never_receives_labels_or_logits():
    seen: list[Message] = []

    def spying_factory(handler, name):
        def spy(message: Message) -> Message:
            seen.append(message)
            return handler(message)

        return InProcessTransport(spy)

    trained = run_training(
        TrainSpec(config="ushape", clients=2, epochs=1), transport_factory=spying_factory
    )
    num_classes = trained.dataset.num_classes
    assert seen, "the spy saw no traffic"
    kinds = {m.kind for m in seen}
    assert kinds <= {Kind.FORWARD, Kind.MIDDLE_GRAD, Kind.PREDICT, Kind.WEIGHTS}, kinds
    lower_names = set(trained.client_segments[0].state_dict())
    for m in seen:
        if m.kind == Kind.WEIGHTS:  # the hand-off carries the bottom segment, never the head
            assert set(m.tensors) <= lower_names, m.tensors.keys()
            continue
        assert set(m.tensors) <= {"act", "grad"}, m.tensors.keys()
        assert not {"loss", "correct", "labels"} & set(m.meta)
        for frame in m.tensors.values():
            array = decode_frame(frame)
            assert array.dtype.kind == "f"  # no integer label frames
            assert array.shape[-1] != num_classes  # nothing shaped like logits
    # the head's output (logits) is computed only on the client
    assert trained.head is not None and trained.head[-1].out_features == num_classes


def _server_and_forward():
    torch.manual_seed(0)
    upper = torch.nn.Sequential(torch.nn.Linear(8, 3))
    server = SplitServer("vanilla", upper)
    act = encode_frame(np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32), "q8")
    labels = encode_frame(np.array([0, 1, 2, 1], dtype=np.uint8), "fp32")
    msg = Message(
        Kind.FORWARD,
        "s1",
        "alice",
        5,
        {"act": act, "labels": labels},
        {"train": True, "want_grad": True},
    )
    return server, upper, msg


def test_repeated_step_is_answered_from_record_not_applied_twice():
    server, upper, msg = _server_and_forward()
    first = server.handle(msg)
    weights = upper[0].weight.detach().clone()
    again = server.handle(msg)
    assert first.kind == Kind.GRADIENT and again.tensors == first.tensors
    assert server.steps_applied == 1 and server.stats["alice"].repeats == 1
    torch.testing.assert_close(upper[0].weight, weights, rtol=0, atol=0)
    older = Message(**{**msg.__dict__, "step": 4})
    assert server.handle(older).kind == Kind.ERROR


def test_malformed_frame_is_an_invalid_argument_reply():
    server, _, msg = _server_and_forward()
    bad = Message(**{**msg.__dict__, "tensors": {**msg.tensors, "act": b"ESF\x01garbage"}})
    reply = server.handle(bad)
    assert reply.kind == Kind.ERROR and reply.meta["code"] == "INVALID_ARGUMENT"
    assert server.handle(msg).kind == Kind.GRADIENT  # and it keeps serving


def test_wrong_label_count_is_refused():
    server, _, msg = _server_and_forward()
    msg.tensors["labels"] = encode_frame(np.array([0, 1], dtype=np.uint8), "fp32")
    reply = server.handle(msg)
    assert reply.kind == Kind.ERROR and "labels shape" in reply.meta["message"]


def test_concurrent_duplicates_apply_once():
    from concurrent.futures import ThreadPoolExecutor

    server, _, msg = _server_and_forward()
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(server.handle, [msg] * 4))
    assert server.steps_applied == 1
    assert all(r.kind == Kind.GRADIENT and r.tensors == replies[0].tensors for r in replies)


def test_bad_probe_copy_applies_nothing():
    server, _, msg = _server_and_forward()
    msg.tensors["act_ref"] = encode_frame(np.zeros((3, 8), dtype=np.float32), "fp32")
    reply = server.handle(msg)
    assert reply.kind == Kind.ERROR and "act_ref shape" in reply.meta["message"]
    assert server.steps_applied == 0


def test_input_that_does_not_fit_the_model_is_invalid_argument():
    server, _, msg = _server_and_forward()
    wide = Message(
        **{
            **msg.__dict__,
            "tensors": {
                **msg.tensors,
                "act": encode_frame(np.zeros((4, 9), dtype=np.float32), "fp32"),
            },
        }
    )
    reply = server.handle(wide)
    assert reply.kind == Kind.ERROR and reply.meta["code"] == "INVALID_ARGUMENT"
    bad_class = Message(
        **{
            **msg.__dict__,
            "step": 6,
            "tensors": {
                **msg.tensors,
                "labels": encode_frame(np.array([0, 1, 2, 99], dtype=np.uint8), "fp32"),
            },
        }
    )
    reply = server.handle(bad_class)
    assert reply.kind == Kind.ERROR and reply.meta["code"] == "INVALID_ARGUMENT"
    assert server.steps_applied == 0 and server.handle(msg).kind == Kind.GRADIENT


def test_decompression_bomb_is_refused_before_allocating():
    server, _, msg = _server_and_forward()
    bomb = encode_frame(np.zeros((1 << 14, 1 << 12), dtype=np.float32), "q1+zstd")  # 64 Mi el.
    assert len(bomb) < 20_000
    reply = server.handle(Message(**{**msg.__dict__, "tensors": {**msg.tensors, "act": bomb}}))
    assert reply.kind == Kind.ERROR and reply.meta["code"] == "INVALID_ARGUMENT"


def test_vertical_failure_reaches_every_party_at_once():
    import time
    from concurrent.futures import ThreadPoolExecutor

    upper = torch.nn.Sequential(torch.nn.Linear(16, 3))
    server = SplitServer("vertical", upper, wait_timeout=30)

    def party(k: int, width: int) -> Message:
        tensors = {"act": encode_frame(np.ones((4, width), dtype=np.float32), "fp32")}
        if k == 0:
            tensors["labels"] = encode_frame(np.array([0, 1, 2, 0], dtype=np.uint8), "fp32")
        return server.handle(
            Message(
                Kind.FORWARD, f"s{k}", f"p{k}", 1, tensors, {"party": k, "parties": 2, "group": "g"}
            )
        )

    start = time.monotonic()
    with ThreadPoolExecutor(2) as pool:  # widths 8 + 9 do not fit the 16-wide server layer
        replies = list(pool.map(party, [0, 1], [8, 9]))
    assert time.monotonic() - start < 10
    assert all(r.kind == Kind.ERROR and r.meta["code"] == "INVALID_ARGUMENT" for r in replies)


def test_state_from_another_server_is_refused(tmp_path):
    import pytest

    from edgesplit.errors import ConfigError
    from edgesplit.train.serving import StateStore

    server, _, msg = _server_and_forward()
    server.spec = {"codec": "q8"}
    store = StateStore(tmp_path, server)
    server.handle(msg)
    store.save()
    other, _, _ = _server_and_forward()
    other.spec = {"codec": "q4"}
    with pytest.raises(ConfigError, match="other settings"):
        StateStore(tmp_path, other).load()
    same, _, _ = _server_and_forward()
    same.spec = {"codec": "q8"}
    assert StateStore(tmp_path, same).load() and same.steps_applied == 1
    assert same.handle(msg).tensors == server.handle(msg).tensors  # answered from the record


def test_a_second_run_on_a_finished_server_is_refused_not_mixed_in():
    server, _, _ = _server_and_forward()
    weights = {"w": encode_frame(np.zeros(3, dtype=np.float32), "fp32")}
    for turn in range(3):  # run 1: three hand-offs
        if turn:
            get = Message(Kind.WEIGHTS, "a", "c", 2 * turn, {}, {"mode": "get", "turn": turn})
            assert server.handle(get).kind == Kind.WEIGHTS
        put = Message(Kind.WEIGHTS, "a", "c", 2 * turn + 1, weights, {"mode": "put"})
        assert server.handle(put).kind == Kind.ACK
    stale = server.handle(Message(Kind.WEIGHTS, "b", "c2", 1, {}, {"mode": "get", "turn": 1}))
    assert stale.kind == Kind.ERROR and "earlier run" in stale.meta["message"]
