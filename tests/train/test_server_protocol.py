"""A strict protocol (issue 9, defects 4 and 7): HELLO binds configuration, mode and codec;
labels are range-checked; non-finite meta is a refusal; a cut that does not fit is named; a
server fault is INTERNAL (and logged), never blamed on the client; run admission happens at
HELLO; weights handed between clients are validated frames."""

from __future__ import annotations

import logging

import numpy as np
import torch

from edgesplit.train.server import SplitServer
from edgesplit.wire.frame import encode_frame
from edgesplit.wire.messages import Kind, Message

LABELS = encode_frame(np.array([0, 1, 2, 1], dtype=np.uint8), "fp32")


def _server(config: str = "vanilla", **kwargs) -> SplitServer:
    torch.manual_seed(0)
    return SplitServer(config, torch.nn.Sequential(torch.nn.Linear(8, 3)), **kwargs)


def _act(width: int = 8, codec: str = "q8") -> bytes:
    return encode_frame(np.random.default_rng(0).normal(size=(4, width)).astype(np.float32), codec)


def _forward(session: str = "s", client: str = "alice", step: int = 1, **tensors) -> Message:
    return Message(
        Kind.FORWARD, session, client, step, {"act": _act(), "labels": LABELS, **tensors}
    )


def _hello(session: str = "s", client: str = "alice", **meta) -> Message:
    return Message(Kind.HELLO, session, client, 0, meta=meta)


def _refused(reply: Message, code: str, *words: str) -> None:
    assert reply.kind == Kind.ERROR, reply
    assert reply.meta["code"] == code, reply.meta
    for word in words:
        assert word in reply.meta["message"], reply.meta["message"]
    assert "\n" not in reply.meta["message"]


def test_hello_for_another_configuration_is_refused():
    server = _server()
    _refused(server.handle(_hello(config="ushape")), "FAILED_PRECONDITION", "ushape", "vanilla")
    assert server.table.count() == 0
    assert server.handle(_hello(config="vanilla", mode="train")).kind == Kind.WELCOME


def test_an_infer_session_cannot_train():
    server = _server()
    assert server.handle(_hello(mode="infer")).kind == Kind.WELCOME
    _refused(server.handle(_forward()), "FAILED_PRECONDITION", "mode=infer")
    weights = {"w": encode_frame(np.zeros(3, dtype=np.float32), "fp32")}
    put = Message(Kind.WEIGHTS, "s", "alice", 2, weights, {"mode": "put"})
    _refused(server.handle(put), "FAILED_PRECONDITION", "mode=infer")
    assert server.steps_applied == 0 and server.handoffs == 0
    predict = Message(Kind.PREDICT, "s", "alice", 3, {"act": _act()})
    assert server.handle(predict).kind == Kind.PREDICTION
    # the same session cannot switch to training by saying HELLO again
    _refused(server.handle(_hello(mode="train")), "FAILED_PRECONDITION", "mode=infer")


def test_bad_mode_and_bad_codec_in_hello_are_invalid_arguments():
    server = _server()
    _refused(server.handle(_hello(mode="admin")), "INVALID_ARGUMENT", "mode", "train, infer")
    _refused(server.handle(_hello(codec="q9")), "INVALID_ARGUMENT", "codec")


def test_frames_must_use_the_codec_hello_announced():
    server = _server()
    assert server.handle(_hello(mode="train", codec="q8")).kind == Kind.WELCOME
    wrong = _forward(act=_act(codec="q4+zstd"))
    _refused(server.handle(wrong), "INVALID_ARGUMENT", "q4+zstd", "'q8'")
    assert server.handle(_forward()).kind == Kind.GRADIENT


def test_predict_before_hello_is_refused_on_a_deployed_server():
    server = _server(require_hello=True)
    predict = Message(Kind.PREDICT, "s", "alice", 1, {"act": _act()})
    _refused(server.handle(predict), "FAILED_PRECONDITION", "HELLO")
    _refused(server.handle(_forward()), "FAILED_PRECONDITION", "HELLO")
    assert server.table.count() == 0
    assert server.handle(_hello(mode="infer")).kind == Kind.WELCOME
    assert server.handle(predict).kind == Kind.PREDICTION


def test_labels_outside_the_class_range_are_refused():
    server = _server()
    for bad in (-100, 3):
        labels = encode_frame(np.array([0, 1, bad, 1], dtype=np.int16), "fp32")
        reply = server.handle(_forward(labels=labels))
        _refused(reply, "INVALID_ARGUMENT", "0..2", str(bad))
    assert server.steps_applied == 0
    # with the class count in the spec, the check happens before any forward pass
    spec_server = _server(spec={"shapes": {"num_classes": 2}})
    _refused(spec_server.handle(_forward()), "INVALID_ARGUMENT", "0..1", "2")


def test_non_finite_or_overflowing_meta_is_invalid_argument():
    server = _server()
    cases = [
        {"mode": "get", "turn": float("inf")},
        {"mode": "get", "turn": 1e400},  # json.loads gives inf for 1e400
        {"mode": "get", "turn": 10**30},
        {"mode": "average", "clients": 2, "round": 0, "index": 0, "n_samples": float("nan")},
        {"mode": "average", "clients": float("inf"), "round": 0, "index": 0},
    ]
    weights = {"w": encode_frame(np.zeros(3, dtype=np.float32), "fp32")}
    for step, meta in enumerate(cases, start=1):
        reply = server.handle(Message(Kind.WEIGHTS, "s", "alice", step, weights, meta))
        _refused(reply, "INVALID_ARGUMENT")
    vertical = _server("vertical")
    reply = vertical.handle(
        Message(Kind.FORWARD, "v", "p", 1, {"act": _act()}, {"party": float("inf"), "parties": 2})
    )
    _refused(reply, "INVALID_ARGUMENT", "party")


def test_a_wrong_cut_width_names_expected_and_got():
    server = _server()
    reply = server.handle(_forward(act=_act(width=9)))
    _refused(reply, "INVALID_ARGUMENT", "(9,)", "8 features")
    assert "mat1" not in reply.meta["message"]
    assert server.handle(_forward()).kind == Kind.GRADIENT
    reply = server.handle(_forward(step=2, act=_act(width=5)))
    _refused(reply, "INVALID_ARGUMENT", "(5,)", "expected per-sample shape (8,)")


class _BrokenDefense:
    """A server-side defect: not something any peer input causes."""

    def server_grad(self, grad, labels):
        raise TypeError("a bug in the server")


def test_a_server_fault_is_internal_and_logged_not_blamed_on_the_client(caplog):
    server = _server()
    server.defense = _BrokenDefense()  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR, logger="edgesplit.train.server"):
        reply = server.handle(_forward())
    _refused(reply, "INTERNAL", "server log")
    assert any(r.exc_info for r in caplog.records)  # the traceback is in the log
    assert server.steps_applied == 0


def test_training_hellos_beyond_the_run_or_after_it_are_refused():
    spec = {"config": "vanilla", "clients": 1, "epochs": 1}
    server = _server(spec=spec)
    assert server.handle(_hello("a1", "alice", mode="train")).kind == Kind.WELCOME
    _refused(
        server.handle(_hello("b1", "bob", mode="train")), "FAILED_PRECONDITION", "1 client", "bob"
    )
    assert server.handle(_hello("b2", "bob", mode="infer")).kind == Kind.WELCOME
    assert server.handle(_forward("a1", "alice")).kind == Kind.GRADIENT
    assert server.handle(Message(Kind.BYE, "a1", "alice", 2)).kind == Kind.ACK
    applied = server.steps_applied
    _refused(server.handle(_hello("a2", "alice", mode="train")), "FAILED_PRECONDITION", "finished")
    assert server.steps_applied == applied


def test_a_turn_based_run_is_finished_after_its_last_hand_off():
    spec = {"config": "vanilla", "clients": 2, "epochs": 1}
    server = _server(spec=spec)
    weights = {"w": encode_frame(np.zeros(3, dtype=np.float32), "fp32")}
    for turn, client in enumerate(("c0", "c1")):
        assert server.handle(_hello(f"s{turn}", client, mode="train")).kind == Kind.WELCOME
        if turn:
            get = Message(Kind.WEIGHTS, f"s{turn}", client, 1, {}, {"mode": "get", "turn": turn})
            assert server.handle(get).kind == Kind.WEIGHTS
        put = Message(Kind.WEIGHTS, f"s{turn}", client, 2, weights, {"mode": "put"})
        assert server.handle(put).kind == Kind.ACK
    _refused(server.handle(_hello("new", "c0", mode="train")), "FAILED_PRECONDITION", "finished")


def test_handed_off_weights_must_be_frames_of_the_expected_shapes():
    schema = {"w": ((3,), "float32")}
    server = _server(weight_schema=schema)
    put = Message(Kind.WEIGHTS, "s", "a", 1, {"w": b"not a frame"}, {"mode": "put"})
    _refused(server.handle(put), "INVALID_ARGUMENT")
    wrong = {"w": encode_frame(np.zeros(4, dtype=np.float32), "fp32")}
    _refused(
        server.handle(Message(Kind.WEIGHTS, "s", "a", 2, wrong, {"mode": "put"})),
        "INVALID_ARGUMENT",
        "(4,)",
        "(3,)",
    )
    other = {"v": encode_frame(np.zeros(3, dtype=np.float32), "fp32")}
    _refused(
        server.handle(Message(Kind.WEIGHTS, "s", "a", 3, other, {"mode": "put"})),
        "INVALID_ARGUMENT",
        "missing",
    )
    assert server.handoffs == 0
    good = {"w": encode_frame(np.ones(3, dtype=np.float32), "fp32")}
    assert server.handle(Message(Kind.WEIGHTS, "s", "a", 4, good, {"mode": "put"})).kind == Kind.ACK


def test_without_a_given_schema_the_first_hand_off_fixes_it():
    server = _server()
    first = {"w": encode_frame(np.ones(3, dtype=np.float32), "fp32")}
    assert (
        server.handle(Message(Kind.WEIGHTS, "s", "a", 1, first, {"mode": "put"})).kind == Kind.ACK
    )
    other = {"w": encode_frame(np.ones((2, 3), dtype=np.float32), "fp32")}
    _refused(
        server.handle(Message(Kind.WEIGHTS, "s", "a", 2, other, {"mode": "put"})),
        "INVALID_ARGUMENT",
        "(2, 3)",
    )


def test_a_vertical_partys_place_cannot_be_taken_by_another_client():
    from concurrent.futures import ThreadPoolExecutor

    server = _server("vertical", wait_timeout=5)

    def predict(client: str, party: int, session: str = "s") -> Message:
        meta = {"party": party, "parties": 2, "group": "g"}
        return server.handle(Message(Kind.PREDICT, session, client, 1, {"act": _act(4)}, meta))

    alone = predict("mallory", 1)
    assert alone.kind == Kind.ERROR and alone.meta["code"] == "DEADLINE_EXCEEDED"
    # a request that was not answered claims nothing: the real party 1 still can join
    with ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(predict, ["imaging", "lab"], [0, 1]))
    assert all(r.kind == Kind.PREDICTION for r in replies), replies
    _refused(predict("mallory", 1, "t"), "FAILED_PRECONDITION", "index 1", "'lab'")


def test_an_unauthenticated_hello_binds_the_session_for_the_name_its_steps_use():
    # without tokens the torch client says HELLO with an empty name, then steps as client-0
    server = _server("vertical", spec={"clients": 1})
    hello = Message(Kind.HELLO, "s", "", 0, meta={"mode": "infer", "index": 0})
    assert server.handle(hello).kind == Kind.WELCOME
    meta = {"party": 0, "parties": 1}
    forward = Message(Kind.FORWARD, "s", "client-0", 1, {"act": _act(), "labels": LABELS}, meta)
    _refused(server.handle(forward), "FAILED_PRECONDITION", "mode=infer")  # the binding holds
    predict = Message(Kind.PREDICT, "s", "client-0", 2, {"act": _act()}, meta)
    assert server.handle(predict).kind == Kind.PREDICTION  # and so does its party's owner
