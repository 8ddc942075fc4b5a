"""What the server keeps per client (issue 9, defects 1 and 2): replay records are per client,
bounded per client and in total, in bytes, never created by a refused request, released on BYE
and on stream close; a client's last applied step is never forgotten while its session lives.

Bytes are measured with the server's own accounting (:meth:`SplitServer.held_bytes`)."""

from __future__ import annotations

import numpy as np
import torch

from edgesplit.train.server import SplitServer
from edgesplit.train.server_records import SESSION_OVERHEAD, RecordLimits
from edgesplit.wire.frame import encode_frame
from edgesplit.wire.messages import Kind, Message


def _vanilla(width: int = 8, **kwargs) -> SplitServer:
    torch.manual_seed(0)
    return SplitServer("vanilla", torch.nn.Sequential(torch.nn.Linear(width, 3)), **kwargs)


def _forward(client: str, session: str, step: int, width: int = 8, rows: int = 4) -> Message:
    act = np.random.default_rng(step).normal(size=(rows, width)).astype(np.float32)
    labels = np.arange(rows, dtype=np.uint8) % 3
    return Message(
        Kind.FORWARD,
        session,
        client,
        step,
        {"act": encode_frame(act, "q8"), "labels": encode_frame(labels, "fp32")},
        {"want_grad": True},
    )


def test_refused_requests_create_nothing_and_cannot_evict_a_victims_record():
    server = _vanilla()
    victim = _forward("alice", "s-alice", 5)
    first = server.handle(victim)
    assert first.kind == Kind.GRADIENT
    held = server.held_bytes()
    garbage = {"act": b"ESF\x01garbage", "labels": victim.tensors["labels"]}
    for i in range(10_001):  # the old shared table held 10,000 sessions
        refused = server.handle(Message(Kind.FORWARD, f"x{i}", "mallory", 1, garbage))
        assert refused.kind == Kind.ERROR
    assert server.held_bytes() == held  # refused requests kept nothing
    assert server.table.count("mallory") == 0
    assert server.handle(_forward("mallory", "m", 1)).kind == Kind.GRADIENT  # one valid step
    applied = server.steps_applied
    again = server.handle(victim)  # alice's reply was lost; she resends step 5
    assert again.kind == Kind.GRADIENT and again.tensors == first.tensors
    assert server.steps_applied == applied  # answered from the record, not applied twice
    assert server.stats["alice"].repeats == 1


def test_accepted_sessions_are_bounded_per_client_and_evict_only_their_own():
    server = _vanilla(record_limits=RecordLimits(sessions_per_client=8))
    victim = _forward("alice", "s-alice", 5)
    first = server.handle(victim)
    for i in range(40):
        assert server.handle(_forward("mallory", f"m{i}", 1)).kind == Kind.GRADIENT
    assert server.table.count("mallory") == 8
    applied = server.steps_applied
    assert server.handle(victim).tensors == first.tensors and server.steps_applied == applied


def test_a_step_whose_reply_was_evicted_is_refused_never_applied_twice():
    # room for about one 16 KiB reply per client: older replies of the session are evicted
    limits = RecordLimits(client_bytes=40_000, total_bytes=1 << 20)
    server = _vanilla(width=1024, record_limits=limits)
    steps = [_forward("alice", "s", step, width=1024, rows=4) for step in range(1, 6)]
    for message in steps:
        assert server.handle(message).kind == Kind.GRADIENT
    assert server.held_bytes("alice") <= limits.client_bytes
    applied = server.steps_applied
    last = server.handle(steps[-1])  # the last step's reply is kept
    assert last.kind == Kind.GRADIENT and server.steps_applied == applied
    old = server.handle(steps[0])  # an older one is refused, not applied again
    assert old.kind == Kind.ERROR and "older" in old.meta["message"]
    assert server.steps_applied == applied


def test_cached_replies_are_bounded_in_bytes_per_client_and_in_total():
    # each reply carries a 4 x 16384 fp32 gradient (256 KiB) for a 600-byte request
    limits = RecordLimits(client_bytes=1 << 20, total_bytes=(3 << 20) // 2)
    server = _vanilla(width=16384, record_limits=limits)
    small = encode_frame(np.zeros((4, 16384), dtype=np.float32), "q1+zstd")
    assert len(small) < 1000
    for client in ("mallory", "eve"):
        for i in range(12):
            message = _forward(client, f"{client}{i}", 1, width=16384)
            message.tensors["act"] = small
            assert server.handle(message).kind == Kind.GRADIENT
            assert server.held_bytes(client) <= limits.client_bytes
            assert server.held_bytes() <= limits.total_bytes
    assert server.held_bytes() > limits.total_bytes // 2  # it does keep what fits


def test_bye_releases_everything_and_stream_close_all_but_the_last_reply():
    server = _vanilla(width=4096)
    for step in range(1, 6):
        assert server.handle(_forward("alice", "s", step, width=4096)).kind == Kind.GRADIENT
    assert server.held_bytes("alice") > 5 * 4 * 4096 * 4
    server.close_session("alice", "s")
    kept = server.held_bytes("alice")
    assert 4 * 4096 * 4 < kept < 2 * 4 * 4096 * 4  # only the last reply (and bookkeeping)
    applied = server.steps_applied
    assert server.handle(_forward("alice", "s", 5, width=4096)).kind == Kind.GRADIENT
    assert server.steps_applied == applied  # a reconnecting client's resend is still answered
    assert server.handle(Message(Kind.BYE, "s", "alice", 6)).kind == Kind.ACK
    assert server.held_bytes("alice") == 0 and server.table.count("alice") == 0


def test_ushape_pending_forwards_are_bounded_and_released_on_close():
    torch.manual_seed(0)
    middle = torch.nn.Sequential(torch.nn.Linear(4096, 256), torch.nn.ReLU())
    limits = RecordLimits(client_bytes=24 << 20, total_bytes=64 << 20)
    server = SplitServer("ushape", middle, record_limits=limits)
    act = encode_frame(np.zeros((64, 4096), dtype=np.float32), "q1+zstd")  # tiny on the wire
    replies = [
        server.handle(Message(Kind.FORWARD, "u", "mallory", step, {"act": act}))
        for step in range(16)
    ]
    assert all(r.kind == Kind.MIDDLE for r in replies)
    # each pending forward holds its input (1 MiB), a weight snapshot (4 MiB) and its graph
    held = server.held_bytes("mallory")
    assert 8 << 20 < held <= limits.client_bytes
    kept = len(server.table.find("mallory", "u").pending)
    server.close_session("mallory", "u")
    # only the latest forward stays, for a client that reconnects and sends its MIDDLE_GRAD
    assert server.held_bytes("mallory") <= SESSION_OVERHEAD + held // kept
    grad = encode_frame(np.ones((64, 256), dtype=np.float32), "fp32")
    old = server.handle(Message(Kind.MIDDLE_GRAD, "u", "mallory", 14, {"grad": grad}))
    assert old.kind == Kind.ERROR and "FORWARD first" in old.meta["message"]
    latest = server.handle(Message(Kind.MIDDLE_GRAD, "u", "mallory", 15, {"grad": grad}))
    assert latest.kind == Kind.GRADIENT and server.steps_applied == 1
    assert server.handle(Message(Kind.BYE, "u", "mallory", 16)).kind == Kind.ACK
    assert server.held_bytes("mallory") == 0


def test_hello_meta_is_not_kept():
    server = _vanilla()
    meta = {"mode": "train", "padding": "x" * (1 << 20)}
    assert server.handle(Message(Kind.HELLO, "s", "alice", 0, meta=meta)).kind == Kind.WELCOME
    assert server.held_bytes("alice") == SESSION_OVERHEAD
    huge = server.handle(Message(Kind.HELLO, "t", "alice", 0, meta={"codec": "q8" * 100_000}))
    assert huge.kind == Kind.ERROR and huge.meta["code"] == "INVALID_ARGUMENT"
    assert server.table.count("alice") == 1


def test_a_reply_too_large_to_keep_is_sent_once_and_its_resend_refused_not_reapplied():
    limits = RecordLimits(client_bytes=8_000, total_bytes=1 << 20)
    server = _vanilla(width=1024, record_limits=limits)
    message = _forward("alice", "s", 1, width=1024)  # a 16 KiB gradient reply
    assert server.handle(message).kind == Kind.GRADIENT
    assert server.held_bytes("alice") == SESSION_OVERHEAD  # the reply was not kept
    again = server.handle(message)
    assert again.kind == Kind.ERROR and again.meta["code"] == "FAILED_PRECONDITION"
    assert "no longer kept" in again.meta["message"] and "step 2" in again.meta["message"]
    assert server.steps_applied == 1
    assert server.handle(_forward("alice", "s", 2, width=1024)).kind == Kind.GRADIENT


def test_status_shows_what_is_kept_against_the_budget():
    import json

    server = _vanilla(record_limits=RecordLimits(client_bytes=1 << 20, total_bytes=1 << 22))
    assert server.handle(_forward("alice", "s", 1)).kind == Kind.GRADIENT
    records = server.status()["records"]
    assert records["held_bytes"] == server.held_bytes() == records["clients"]["alice"] > 0
    assert records["client_bytes_limit"] == 1 << 20 and records["sessions"] == 1
    json.dumps(server.status())  # JSON-able, as the Status RPC sends it
